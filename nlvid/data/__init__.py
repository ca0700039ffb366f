"""Video data: decoding (PyAV), datasets and loaders, clip sampling, transforms, the synthetic long-range dataset."""

from nlvid.data.dataset import (
    DatasetIndex,
    VideoDataset,
    make_loader,
    resolve_splits,
    scan_dataset,
)
from nlvid.data.decode import VideoInfo, probe, read_clip, read_frames
from nlvid.data.stream import VideoSource, WindowScheduler, parse_source
from nlvid.data.synthetic import write_synthetic
from nlvid.data.transforms import test_views

__all__ = [
    "DatasetIndex",
    "VideoDataset",
    "VideoInfo",
    "VideoSource",
    "WindowScheduler",
    "make_loader",
    "parse_source",
    "probe",
    "read_clip",
    "read_frames",
    "resolve_splits",
    "scan_dataset",
    "test_views",
    "write_synthetic",
]
