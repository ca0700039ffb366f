"""Video data: decoding (PyAV), datasets, sampling, transforms, the synthetic long-range dataset.

Public names are imported lazily:
    read_clip, read_frames, probe, VideoInfo              nlvid.data.decode
    resolve_splits, scan_dataset, DatasetIndex,
    VideoDataset, make_loader, format_scan_table          nlvid.data.dataset
    test_views                                            nlvid.data.transforms
    write_synthetic                                       nlvid.data.synthetic
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "read_clip": "nlvid.data.decode",
    "read_frames": "nlvid.data.decode",
    "probe": "nlvid.data.decode",
    "VideoInfo": "nlvid.data.decode",
    "resolve_splits": "nlvid.data.dataset",
    "scan_dataset": "nlvid.data.dataset",
    "DatasetIndex": "nlvid.data.dataset",
    "VideoDataset": "nlvid.data.dataset",
    "make_loader": "nlvid.data.dataset",
    "format_scan_table": "nlvid.data.dataset",
    "test_views": "nlvid.data.transforms",
    "write_synthetic": "nlvid.data.synthetic",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'nlvid.data' has no attribute {name!r}")
