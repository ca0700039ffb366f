"""Export a model to a file other runtimes load: ONNX, TorchScript, or a torch.export ExportedProgram.

The exported graph takes one float32 tensor `clip` of shape (B, 3, T, S, S) with a dynamic batch axis B (T and S
are the checkpoint's clip shape: `data.num_frames` and `data.test_crop_size`) and returns `logits` (B, classes):
unnormalised class scores, the model's output before the softmax that `nlvid predict` / `nlvid eval` apply (they
average the softmax over views). The file also carries what a user needs to feed it and to read its output, as
one JSON document under the key `nlvid.json` (`METADATA_KEY`; see `export_metadata` for its fields):
    onnx              the model's metadata_props (onnxruntime: session.get_modelmeta().custom_metadata_map)
    torchscript       an extra file (torch.jit.load(path, _extra_files={"nlvid.json": ""}) fills the dict)
    exported-program  an extra file (torch.export.load(path, extra_files={"nlvid.json": ""}))
TorchScript and ExportedProgram files are zip archives holding it at `<archive>/extra/nlvid.json` as well, so
`unzip -p FILE '*/extra/nlvid.json'` reads it without torch; `read_metadata` reads any of the three.

How each format is made (the model in eval mode, parameters frozen, CPU):
    onnx              torch.onnx.export(dynamo=True) (the torch.export-based exporter; needs onnx and onnxscript),
                      checked with onnxruntime: the optional `export` extra, `pip install 'nlvid[export]'`. One
                      file, weights inside (ONNX's 2 GB protobuf limit). One rewrite: MatMul with a 1-D second
                      input -> Unsqueeze, MatMul, Squeeze (an onnxruntime optimiser bug, see _matvec_as_matmul).
    torchscript       torch.jit.trace: the batch size is traced through the tensors' sizes; the clip shape
                      (T, S) is fixed, as it is in every format.
    exported-program  torch.export.export with a dynamic batch dimension, saved with torch.export.save.

Non-local blocks: exported through the model's own path where it can be (impl "auto" = the fast path: fused
scaled_dot_product_attention for the gaussians, BN folded into W_z, ...; see nlvid.models.nonlocal_block).
concatenation blocks are always exported through impl="explicit" (the reference conv + bmm + softmax + bmm; the
same outputs, more memory): their fast path runs query chunks sized from the batch in a Python autograd.Function,
which TorchScript cannot trace, torch.export refuses for a dynamic batch, and the ONNX exporter would keep as ONE
chunk (wrong rows for batches that need two). Where any other fast path fails to export, every block is switched
to impl="explicit" and the export retried. The report and the metadata say which path the file holds, and why.

After writing, the file is loaded back and run on a random clip (batch 1, not the batch of 2 the export traced, so
the dynamic axis is exercised) next to the eager model as `nlvid predict` runs it; the max absolute difference of
the logits is returned. The file is written to a temporary name in the target folder and renamed only when that
check passes, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nlvid import __version__
from nlvid.checkpoint import first_line
from nlvid.errors import ConfigError, ExportError, NlvidError, OutputError, writing
from nlvid.models.nonlocal_block import NonLocalBlock

Progress = Callable[..., None]

FORMATS = ("onnx", "torchscript", "exported-program")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt", "exported-program": ".pt2"}  # what the docs suggest; not enforced
METADATA_KEY = "nlvid.json"
INPUT_NAME = "clip"
OUTPUT_NAME = "logits"
INSTALL_HINT = "pip install 'nlvid[export]'"
# The command fails when the exported model's logits differ from eager by more than this, relative to the largest
# logit (at least 1): a broken export, not fp32 rounding (measured: ~1e-6 relative or less on whole models).
CHECK_TOLERANCE = 1e-3
EXAMPLE_BATCH = 2  # the batch the export traces; the check runs batch 1


# ----------------------------------------------------------------------------------------------------------------
# Metadata
# ----------------------------------------------------------------------------------------------------------------


def export_metadata(
    *,
    classes: Sequence[str],
    num_frames: int,
    stride: int,
    test_short_side: int,
    test_crop_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    num_clips: int | None = None,
    num_crops: int | None = None,
    model_name: str | None = None,
) -> dict[str, Any]:
    """The JSON document an exported file carries under `METADATA_KEY`: class names, input/output description and
    the test-time preprocessing of `nlvid predict` (the keyword arguments of `nlvid.config.test_data_kwargs`).
    `export_graph` adds "nonlocal_impl": the Non-local path the file holds ("fast", "explicit", None)."""
    short = max(int(test_short_side), int(test_crop_size))  # test_views scales a smaller short side up to the crop
    return {
        "format": "nlvid-export",
        "nlvid_version": __version__,
        "model": model_name,
        "classes": list(classes),
        "input": {
            "name": INPUT_NAME,
            "layout": "B,3,T,H,W",
            "shape": ["B", 3, int(num_frames), int(test_crop_size), int(test_crop_size)],
            "dtype": "float32",
            "batch": "dynamic",
        },
        "output": {
            "name": OUTPUT_NAME,
            "shape": ["B", len(classes)],
            "kind": "logits",
            "note": "unnormalised class scores; softmax(logits) gives probabilities (nlvid predict averages the "
                    "softmax over its views)",
        },
        "preprocessing": {
            "color": "RGB",
            "num_frames": int(num_frames),
            "sampling_stride": int(stride),
            "short_side": short,
            "crop_size": int(test_crop_size),
            "mean": [float(m) for m in mean],
            "std": [float(s) for s in std],
            "normalize": "x = (pixel / 255 - mean) / std per channel",
            "frames": "num_frames frames, every sampling_stride-th frame of the video",
            "resize": "short side to short_side (antialiased bilinear), then crop_size x crop_size crops",
            "num_clips": num_clips,
            "num_crops": num_crops,
        },
    }


def read_metadata(path: str | Path, *, format: str) -> dict[str, Any]:
    """The `METADATA_KEY` document of an exported file (ONNX needs the `onnx` package; the others only zipfile)."""
    check_format(format)
    path = Path(path)
    try:
        if format == "onnx":
            onnx, _ = _onnx_modules()
            proto = onnx.load(str(path), load_external_data=False)
            text = {p.key: p.value for p in proto.metadata_props}.get(METADATA_KEY)
        else:
            with zipfile.ZipFile(path) as z:
                names = [n for n in z.namelist() if n.endswith(f"/extra/{METADATA_KEY}")]
                text = z.read(names[0]).decode("utf-8") if names else None
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        raise ExportError(f"{path}: cannot read it as an exported {format} file ({first_line(e)})") from None
    if text is None:
        raise ExportError(f"{path}: no {METADATA_KEY} in it (not written by nlvid export)")
    return json.loads(text)


# ----------------------------------------------------------------------------------------------------------------
# Checks before any work
# ----------------------------------------------------------------------------------------------------------------


def check_format(format: str) -> str:
    if format not in FORMATS:
        raise ConfigError(f"format: {format!r} is not one of {', '.join(FORMATS)}", key="format")
    return format


def _onnx_modules():
    """(onnx, onnxruntime), or one ExportError saying how to install them (torch.onnx also needs onnxscript)."""
    missing = []
    try:
        import onnx  # optional heavy dependency (the `export` extra): only --format onnx needs it
    except ImportError:
        missing.append("onnx")
    try:
        import onnxscript  # noqa: F401  optional heavy dependency: torch.onnx.export(dynamo=True) imports it
    except ImportError:
        missing.append("onnxscript")
    try:
        import onnxruntime  # optional heavy dependency: runs the exported graph for the check
    except ImportError:
        missing.append("onnxruntime")
    if missing:
        raise ExportError(f"ONNX export needs {', '.join(missing)}, not installed here: {INSTALL_HINT}")
    return onnx, onnxruntime


def check_export_target(out: str | Path, *, format: str) -> Path:
    """Fail early, before loading a model: a known format, its packages installed (onnx), an existing folder for
    `out` and `out` not a folder. Returns `out` as a Path."""
    check_format(format)
    out = Path(out)
    if format == "onnx":
        _onnx_modules()
    parent = out.parent
    if not parent.is_dir():
        raise OutputError(f"{parent}: output folder does not exist (create it first)", key="out")
    if out.is_dir():
        raise OutputError(f"{out}: is a folder; give a file name", key="out")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Writers and runners per format
# ----------------------------------------------------------------------------------------------------------------


def _dynamic_batch() -> tuple[dict[int, Any]]:
    return ({0: torch.export.Dim("batch", min=1)},)


def _write_onnx(model: nn.Module, example: torch.Tensor, tmp: Path, meta: str) -> None:
    onnx, _ = _onnx_modules()
    program = torch.onnx.export(model, (example,), None, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                dynamic_shapes=_dynamic_batch(), dynamo=True, verbose=False)
    proto = _matvec_as_matmul(onnx, program.model_proto)
    proto.metadata_props.add(key=METADATA_KEY, value=meta)
    onnx.save(proto, str(tmp))


def _matvec_as_matmul(onnx, proto):
    """Every MatMul(A, v) with a 1-D v (the concatenation block's w . theta) becomes
    Squeeze(MatMul(A, Unsqueeze(v, -1)), -1): the same numbers. onnxruntime 1.32's MatmulTransposeFusion (default
    optimisation level) folds a Transpose feeding such a MatMul into a FusedMatMul that computes wrong values (the
    explicit concatenation block was off by ~100% relative); with a 2-D v the fusion is correct."""
    inferred = onnx.shape_inference.infer_shapes(proto)
    ranks = {init.name: len(init.dims) for init in proto.graph.initializer}
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        if vi.type.tensor_type.HasField("shape"):
            ranks[vi.name] = len(vi.type.tensor_type.shape.dim)
    axes = "nlvid_last_axis"
    nodes, changed = [], 0
    for node in proto.graph.node:
        if node.op_type == "MatMul" and ranks.get(node.input[1]) == 1:
            col, mat = f"{node.output[0]}_nlvid_col", f"{node.output[0]}_nlvid_mat"
            nodes += [onnx.helper.make_node("Unsqueeze", [node.input[1], axes], [col]),
                      onnx.helper.make_node("MatMul", [node.input[0], col], [mat], name=node.name),
                      onnx.helper.make_node("Squeeze", [mat, axes], [node.output[0]])]
            changed += 1
        else:
            nodes.append(node)
    if changed:
        del proto.graph.node[:]
        proto.graph.node.extend(nodes)
        proto.graph.initializer.append(onnx.numpy_helper.from_array(np.array([-1], dtype=np.int64), axes))
    return proto


def _write_torchscript(model: nn.Module, example: torch.Tensor, tmp: Path, meta: str) -> None:
    with warnings.catch_warnings():
        # TracerWarnings name the shape checks of the blocks (the clip shape is fixed by design); the deprecation
        # notice of torch.jit is for the user to read in the docs, not on every export
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (example,), check_trace=False, _store_inputs=False)
        buf = io.BytesIO()
        torch.jit.save(traced, buf, _extra_files={METADATA_KEY: meta})
    tmp.write_bytes(buf.getvalue())


def _write_exported_program(model: nn.Module, example: torch.Tensor, tmp: Path, meta: str) -> None:
    program = torch.export.export(model, (example,), dynamic_shapes=_dynamic_batch())
    program.example_inputs = None  # not stored in the file: a clip batch of a large model is tens of MB
    buf = io.BytesIO()  # a buffer: torch.export.save warns about file names not ending in .pt2
    torch.export.save(program, buf, extra_files={METADATA_KEY: meta})
    tmp.write_bytes(buf.getvalue())


def _run_onnx(path: Path, x: torch.Tensor) -> torch.Tensor:
    _, ort = _onnx_modules()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0])


def _run_torchscript(path: Path, x: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
        loaded = torch.jit.load(str(path), map_location="cpu")
    with torch.inference_mode():
        return loaded(x)


def _run_exported_program(path: Path, x: torch.Tensor) -> torch.Tensor:
    with open(path, "rb") as f:
        module = torch.export.load(f).module()
    with torch.inference_mode():
        return module(x)


_WRITERS = {"onnx": _write_onnx, "torchscript": _write_torchscript, "exported-program": _write_exported_program}
_RUNNERS = {"onnx": _run_onnx, "torchscript": _run_torchscript, "exported-program": _run_exported_program}


def run_exported(path: str | Path, x: torch.Tensor, *, format: str) -> torch.Tensor:
    """Logits of an exported file for a clip batch x (B, 3, T, S, S), on CPU (onnxruntime for ONNX)."""
    return _RUNNERS[check_format(format)](Path(path), x.detach().float().cpu().contiguous())


# ----------------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------------


# Instantiations whose fast path a graph with a dynamic batch cannot hold, and why. Found by exporting each one:
# torch.jit.trace refuses the autograd.Function, torch.export refuses the batch-dependent chunk size, and
# torch.onnx.export(dynamo=True) accepted it but kept ONE chunk of a size computed from the batch, so that a batch
# large enough to need two chunks (7 clips of an R50 at 224 px) would leave rows of the output unset.
_NO_FAST_EXPORT = {
    "concatenation": "its fast path runs query chunks sized from the batch in a Python autograd.Function",
}


def _blocks(model: nn.Module) -> list[NonLocalBlock]:
    return [m for m in model.modules() if isinstance(m, NonLocalBlock)]


def _path(block: NonLocalBlock) -> str:
    return "explicit" if block.impl == "explicit" else "fast"  # "auto" runs the fast path


def _nonlocal_path(model: nn.Module) -> str | None:
    """"fast" / "explicit" (every block), "fast+explicit" (both kinds), None without NL blocks."""
    paths = sorted({_path(b) for b in _blocks(model)}, reverse=True)
    return "+".join(paths) if paths else None


@contextlib.contextmanager
def _frozen(model: nn.Module, impls: Sequence[str] | None = None) -> Iterator[None]:
    """The model as the exporters need it: eval mode, parameters not requiring grad (so that no training-only
    path is traced), NL block k's impl set to impls[k] (None: unchanged); all restored afterwards."""
    training = model.training
    grads = [(p, p.requires_grad) for p in model.parameters()]
    blocks = _blocks(model)
    before = [b.impl for b in blocks]
    try:
        model.eval()
        for p, _ in grads:
            p.requires_grad_(False)
        for b, impl in zip(blocks, impls or before):
            b.impl = impl
        yield
    finally:
        for b, impl in zip(blocks, before):
            b.impl = impl
        for p, g in grads:
            p.requires_grad_(g)
        model.train(training)


def _short(reason: str) -> str:
    """The first sentence of an exporter's message (the rest is advice about torch internals)."""
    for stop in (". ", "! "):
        if stop in reason:
            reason = reason.split(stop, 1)[0]
    return reason.rstrip(".!")


def _temp_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.{os.getpid()}.tmp")


def export_graph(
    model: nn.Module,
    out: str | Path,
    *,
    format: str,
    input_shape: Sequence[int],
    metadata: dict[str, Any] | None = None,
    output_shape: Sequence[int] | None = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Export any module taking one float tensor (B, *input_shape) (a classifier, a single NL block) to `out`,
    batch dynamic, with `metadata` (plus "nonlocal_impl") as `METADATA_KEY`; load it back, compare it with eager
    on a random batch of 1 and rename it into place only if it matches. `output_shape`: what the model must return
for one sample (checked before exporting). Returns a report:

    {"file", "format", "bytes", "input": [None, *input_shape], "output": [None, ...], "nonlocal_impl": "fast" |
     "explicit" | "fast+explicit" | None (no NL blocks), "fallback": None or why some blocks were exported through
     the explicit path, "check": {"batch": 1, "max_abs_diff", "max_abs_output", "tolerance"}, "metadata_key"}.

    progress(event, **data): "export" (format, nonlocal_impl), "fallback" (reason, retry: whether an export
    failed first), "check" (batch). The model
    is moved to the CPU and otherwise left as it came (mode, requires_grad, NL impl).
    """
    out = check_export_target(out, format=format)
    model = model.cpu()
    shape = tuple(int(s) for s in input_shape)
    gen = torch.Generator().manual_seed(seed)
    example = torch.randn(EXAMPLE_BATCH, *shape, generator=gen)
    x = torch.randn(1, *shape, generator=gen)
    with _frozen(model), torch.inference_mode():
        reference = model(x).float()  # as nlvid predict runs it: eval mode, inference mode, the model's own path
    if output_shape is not None and tuple(reference.shape[1:]) != tuple(output_shape):
        raise ExportError(f"the model returns shape {tuple(reference.shape)} for one input, expected "
                         f"{(1, *output_shape)}; nothing written")

    def emit(event: str, **data: Any) -> None:
        if progress is not None:
            progress(event, **data)

    blocks = _blocks(model)
    first = ["explicit" if b.instantiation in _NO_FAST_EXPORT else b.impl for b in blocks]
    notes = sorted({f"{b.instantiation}: {_NO_FAST_EXPORT[b.instantiation]}" for b in blocks
                    if b.instantiation in _NO_FAST_EXPORT and _path(b) == "fast"})
    attempts = [first]
    if any(impl != "explicit" for impl in first):
        attempts.append(["explicit"] * len(blocks))  # where the fast path fails to export: the reference path
    fallback = f"the fast path cannot be exported ({'; '.join(notes)})" if notes else None
    if fallback:
        emit("fallback", reason=fallback, retry=False)
    tmp = _temp_path(out)
    try:
        for i, impls in enumerate(attempts):
            with _frozen(model, impls):
                impl_used = _nonlocal_path(model)
                meta = dict(metadata or {}, nonlocal_impl=impl_used)
                emit("export", format=format, nonlocal_impl=impl_used)
                try:
                    with writing(out, f"{format} file"):
                        _WRITERS[format](model, example, tmp, json.dumps(meta))
                    break
                except NlvidError:
                    raise
                except Exception as e:  # noqa: BLE001 - exporters raise many kinds; one line names the cause
                    tmp.unlink(missing_ok=True)
                    reason = _short(first_line(e))
                    if i + 1 < len(attempts):
                        fallback = f"the fast path did not export to {format}: {reason}"
                        emit("fallback", reason=fallback, retry=True)
                        continue
                    raise ExportError(f"{format} export failed: {reason}") from None
        emit("check", batch=1)
        try:
            got = run_exported(tmp, x, format=format).float()
        except Exception as e:  # noqa: BLE001 - a file its own runtime cannot run is a failed export
            raise ExportError(f"the exported {format} file does not run: {first_line(e)}") from None
        if tuple(got.shape) != tuple(reference.shape):
            raise ExportError(f"the exported {format} model returns shape {tuple(got.shape)}, eager "
                             f"{tuple(reference.shape)}; nothing written")
        diff = float((got - reference).abs().max())
        scale = max(1.0, float(reference.abs().max()))
        if not diff <= CHECK_TOLERANCE * scale:  # also catches NaN
            raise ExportError(f"the exported {format} model differs from eager by {diff:.3g} (max |output| "
                             f"{scale:.3g}, tolerance {CHECK_TOLERANCE:g} relative); nothing written")
        with writing(out, f"{format} file"):
            os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {
        "file": str(out),
        "format": format,
        "bytes": out.stat().st_size,
        "input": [None, *shape],
        "output": [None, *reference.shape[1:]],
        "nonlocal_impl": impl_used,
        "fallback": fallback,
        "check": {"batch": 1, "max_abs_diff": diff, "max_abs_output": float(reference.abs().max()),
                  "tolerance": CHECK_TOLERANCE},
        "metadata_key": METADATA_KEY,
    }


def export_model(
    model: nn.Module,
    classes: Sequence[str],
    out: str | Path,
    *,
    format: str,
    num_frames: int,
    stride: int,
    test_short_side: int,
    test_crop_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    num_clips: int | None = None,
    num_crops: int | None = None,
    model_name: str | None = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Export a clip classifier (`nlvid.models.load_model`) to `out` in `format`: `export_graph` with the clip
    shape (3, num_frames, test_crop_size, test_crop_size) and `export_metadata` (class names, preprocessing).

    The data keywords are `nlvid.config.test_data_kwargs(cfg.data)`. The report is `export_graph`'s, plus
    "output_kind": "logits" and "classes" (their number)."""
    shape = (3, int(num_frames), int(test_crop_size), int(test_crop_size))
    meta = export_metadata(classes=classes, num_frames=num_frames, stride=stride, test_short_side=test_short_side,
                           test_crop_size=test_crop_size, mean=mean, std=std, num_clips=num_clips,
                           num_crops=num_crops, model_name=model_name)
    result = export_graph(model, out, format=format, input_shape=shape, metadata=meta,
                          output_shape=(len(classes),), seed=seed, progress=progress)
    return dict(result, output_kind=OUTPUT_NAME, classes=len(classes))
