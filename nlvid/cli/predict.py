"""`nlvid predict` (not implemented yet: says so and exits 1)."""

from nlvid.cli.common import not_available


def predict() -> None:
    """Not available yet."""
    not_available("predict")
