"""`nlvid visualize` (not implemented yet: says so and exits 1)."""

from nlvid.cli.common import not_available


def visualize() -> None:
    """Not available yet."""
    not_available("visualize")
