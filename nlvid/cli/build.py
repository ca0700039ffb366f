"""`nlvid build` (not implemented yet: says so and exits 1)."""

from nlvid.cli.common import not_available


def build() -> None:
    """Not available yet."""
    not_available("build")
