"""`python -m nlvid ...` (what `torchrun -m nlvid train ...` runs)."""

from nlvid.cli import main

if __name__ == "__main__":
    main()
