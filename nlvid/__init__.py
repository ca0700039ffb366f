"""nlvid: video classification with Non-local neural networks (Wang et al., CVPR 2018)."""

__version__ = "0.1.0"
