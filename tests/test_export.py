"""`nlvid export`: ONNX / TorchScript / ExportedProgram files with a dynamic batch axis that give eager's logits,
carry the class names and preprocessing, take every NL instantiation, and fail in one line without leaving files.

The default pass exports single NL blocks (every instantiation, to ONNX, run by onnxruntime) and one small
checkpoint per format through the CLI; the slow pass exports a whole model per instantiation and format."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from cli_helpers import run_cli
from nlvid.checkpoint import save_checkpoint
from nlvid.config import load_config
from nlvid.engine import export as ex
from nlvid.models import create_model, list_models, load_model
from nlvid.models import nonlocal_block as nlb
from nlvid.models.nonlocal_block import NonLocalBlock

INSTS = ["gaussian", "embedded_gaussian", "dot_product", "concatenation", "global_context"]
CLASSES = ["walk", "run", "jump", "swim", "climb"]
TOL = 1e-4  # max abs diff relative to the largest output (at least 1)



def _ort():
    """onnxruntime, or skip: the ONNX tests need the export extra (pip install 'nlvid[export]')."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    return pytest.importorskip("onnxruntime")


def _randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-zero weights in every NL block (out, bn, ln included) so that the attention changes the output."""
    gen = torch.Generator().manual_seed(seed)
    blocks = [module] if isinstance(module, NonLocalBlock) else [m for m in module.modules()
                                                                  if isinstance(m, NonLocalBlock)]
    with torch.no_grad():
        for block in blocks:
            for name, p in block.named_parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if name.startswith(("theta", "phi")) else 0.5))
            if block.norm == "bn":
                block.bn.running_mean.copy_(torch.randn(block.dim_in, generator=gen) * 0.1)
                block.bn.running_var.copy_(torch.rand(block.dim_in, generator=gen) + 0.5)
    return module.eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) / max(1.0, float(b.abs().max()))


def _eager(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x)


def _onnx_run(path: Path, x: torch.Tensor) -> torch.Tensor:
    session = _ort().InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"clip": x.numpy()})[0])


def _checkpoint(path: Path, instantiation: str = "embedded_gaussian") -> Path:
    """A tiny model (8 frames x 64 px, 5 classes, NL blocks with random weights) saved as an nlvid checkpoint."""
    cfg = load_config("tiny", [f"model.instantiation={instantiation}", "model.num_classes=5"],
                      model_names=list_models())
    model = _randomise(create_model("tiny", num_classes=5, instantiation=instantiation))
    save_checkpoint(path, model_state=model.state_dict(), config=cfg.to_dict(), classes=CLASSES)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("export") / "tiny.pt")


# ------------------------------------------------------------------------------------------ every instantiation


@pytest.mark.parametrize("inst", INSTS)
def test_block_onnx_matches_eager_at_batch_1_2_3(inst, tmp_path, monkeypatch):
    """Each instantiation as one block: ONNX under onnxruntime == eager (impl auto) at batch 1, 2 and 3. The
    concatenation chunk budget is set so that eager splits batch 3 into two query chunks (the fast path's chunk
    count depends on the batch; the export must not freeze it)."""
    _ort()
    block = _randomise(NonLocalBlock(16, instantiation=inst, pool_size=(1, 2, 2)))
    shape = (16, 4, 6, 6)  # n = 144 queries, n' = 36 keys
    monkeypatch.setattr(nlb, "_CONCAT_CHUNK_ELEMS", 2 * 144 * 36)  # one chunk up to batch 2, two at batch 3
    result = ex.export_graph(block, tmp_path / "nl.onnx", format="onnx", input_shape=shape)
    assert result["nonlocal_impl"] == ("explicit" if inst == "concatenation" else "fast")
    assert result["check"]["max_abs_diff"] <= TOL * max(1.0, result["check"]["max_abs_output"])
    assert block.impl == "auto" and not block.training  # left as it came
    gen = torch.Generator().manual_seed(1)
    for batch in (1, 2, 3):
        x = torch.randn(batch, *shape, generator=gen)
        want = _eager(block, x)
        assert (want - x).abs().max() > 1e-3  # the block is not the identity
        assert _rel(_onnx_run(tmp_path / "nl.onnx", x), want) < TOL, (inst, batch)


@pytest.mark.parametrize("inst,mode,position", [("embedded_gaussian", "space", "after"),
                                                 ("dot_product", "time", "input"),
                                                 ("global_context", "space", "input")])
def test_block_onnx_modes(inst, mode, position, tmp_path):
    """Space / time modes fold T or H*W into the batch: the folded batch stays dynamic."""
    _ort()
    block = _randomise(NonLocalBlock(16, instantiation=inst, mode=mode, pool_position=position))
    shape = (16, 4, 6, 6)
    ex.export_graph(block, tmp_path / "nl.onnx", format="onnx", input_shape=shape)
    for batch in (1, 2, 3):
        x = torch.randn(batch, *shape)
        assert _rel(_onnx_run(tmp_path / "nl.onnx", x), _eager(block, x)) < TOL, (inst, mode, batch)


def test_fast_paths_that_export_are_used(tmp_path):
    """TorchScript of a gaussian block keeps the fast path (no fallback); a concatenation block says why not."""
    for inst, impl in (("embedded_gaussian", "fast"), ("concatenation", "explicit")):
        block = _randomise(NonLocalBlock(8, instantiation=inst))
        r = ex.export_graph(block, tmp_path / f"{inst}.pt", format="torchscript", input_shape=(8, 2, 4, 4))
        assert r["nonlocal_impl"] == impl
        assert (r["fallback"] is None) == (impl == "fast")
        assert ex.read_metadata(tmp_path / f"{inst}.pt", format="torchscript")["nonlocal_impl"] == impl


# ------------------------------------------------------------------------------------------ the command


def _check_metadata(meta: dict) -> None:
    assert meta["classes"] == CLASSES
    assert meta["model"] == "tiny"
    assert meta["input"]["layout"] == "B,3,T,H,W" and meta["input"]["shape"] == ["B", 3, 8, 64, 64]
    assert meta["output"]["kind"] == "logits" and meta["output"]["shape"] == ["B", 5]
    pre = meta["preprocessing"]
    assert (pre["num_frames"], pre["sampling_stride"], pre["short_side"], pre["crop_size"]) == (8, 2, 64, 64)
    assert pre["mean"] == [0.45] * 3 and pre["std"] == [0.225] * 3
    assert meta["nonlocal_impl"] == "fast"


def test_cli_onnx(ckpt, tmp_path, capsys):
    _ort()
    out = tmp_path / "tiny.onnx"
    code, stdout, stderr = run_cli(["export", ckpt, "--format", "onnx", "--out", out], capsys)
    assert code == 0, stderr
    assert "max abs difference vs eager" in stdout and "logits" in stdout and str(out) in stdout
    assert "exporting to onnx" in stderr and "max abs" not in stderr  # progress on stderr, the result on stdout
    diff = float(stdout.split("max abs difference vs eager: ")[1].split()[0])
    assert diff < 1e-4
    _check_metadata(ex.read_metadata(out, format="onnx"))
    # what onnxruntime users read: the same JSON in the model's custom metadata
    session = _ort().InferenceSession(str(out), providers=["CPUExecutionProvider"])
    meta = json.loads(session.get_modelmeta().custom_metadata_map["nlvid.json"])
    _check_metadata(meta)
    assert [i.shape[0] for i in session.get_inputs()] == ["batch"]
    model, classes, _ = load_model(ckpt)
    for batch in (1, 2):
        x = torch.randn(batch, 3, 8, 64, 64)
        assert _rel(_onnx_run(out, x), _eager(model, x)) < TOL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx"]  # no temp file left


def test_cli_torchscript_json(ckpt, tmp_path, capsys):
    out = tmp_path / "tiny.ts"
    code, stdout, stderr = run_cli(["export", ckpt, "--format", "torchscript", "--out", out, "--json"], capsys)
    assert code == 0, stderr
    r = json.loads(stdout)
    assert r["format"] == "torchscript" and r["output_kind"] == "logits" and r["input"] == [None, 3, 8, 64, 64]
    assert r["nonlocal_impl"] == "fast" and r["fallback"] is None and r["check"]["max_abs_diff"] < 1e-4
    extra = {"nlvid.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.jit.load(str(out), _extra_files=extra)
    _check_metadata(json.loads(extra["nlvid.json"]))
    model, _, _ = load_model(ckpt)
    for batch in (1, 2):
        x = torch.randn(batch, 3, 8, 64, 64)
        assert _rel(_eager(loaded, x), _eager(model, x)) < TOL


def test_cli_exported_program(ckpt, tmp_path, capsys):
    out = tmp_path / "tiny.pt2"
    code, stdout, stderr = run_cli(["export", ckpt, "--format", "exported-program", "--out", out], capsys)
    assert code == 0, stderr
    extra = {"nlvid.json": ""}
    program = torch.export.load(str(out), extra_files=extra)
    _check_metadata(json.loads(extra["nlvid.json"]))
    module = program.module()
    model, _, _ = load_model(ckpt)
    for batch in (1, 2):
        x = torch.randn(batch, 3, 8, 64, 64)
        assert _rel(_eager(module, x), _eager(model, x)) < TOL


def test_cli_concatenation_says_explicit(tmp_path, capsys):
    path = _checkpoint(tmp_path / "concat.pt", "concatenation")
    code, stdout, stderr = run_cli(["export", path, "--format", "torchscript", "--out", tmp_path / "c.pt"], capsys)
    assert code == 0, stderr
    assert "explicit path" in stdout and "cannot be exported" in stdout
    assert "impl=explicit" in stderr


# ------------------------------------------------------------------------------------------ bad inputs


def test_unknown_format_is_a_usage_error(ckpt, tmp_path, capsys):
    code, _, err = run_cli(["export", ckpt, "--format", "tflite", "--out", tmp_path / "m.x"], capsys)
    assert code == 2
    assert "'tflite' is not one of onnx, torchscript, exported-program" in err
    assert len(err.strip().splitlines()) == 1


def test_missing_output_folder(ckpt, tmp_path, capsys):
    missing = tmp_path / "nope"
    code, out, err = run_cli(["export", ckpt, "--format", "torchscript", "--out", missing / "m.pt"], capsys)
    assert code == 1 and out == ""
    assert str(missing) in err and "does not exist" in err and len(err.strip().splitlines()) == 1
    assert not missing.exists()


def test_out_is_a_folder(ckpt, tmp_path, capsys):
    code, _, err = run_cli(["export", ckpt, "--format", "torchscript", "--out", tmp_path], capsys)
    assert code == 1 and "is a folder" in err


def test_missing_checkpoint(tmp_path, capsys):
    code, _, err = run_cli(["export", tmp_path / "none.pt", "--format", "torchscript", "--out", tmp_path / "m.pt"],
                           capsys)
    assert code == 1 and "not found" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("package", ["onnx", "onnxruntime", "onnxscript"])
def test_onnx_without_the_extra(ckpt, tmp_path, capsys, monkeypatch, package):
    """Whichever package of the extra is missing (simulated: a None entry makes `import` fail), one line says how
    to install it, before the checkpoint is loaded."""
    monkeypatch.setitem(sys.modules, package, None)  # `import package` raises ImportError
    code, out, err = run_cli(["export", ckpt, "--format", "onnx", "--out", tmp_path / "m.onnx"], capsys)
    assert code == 1 and out == ""
    assert "pip install 'nlvid[export]'" in err and package in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_failed_check_leaves_nothing(ckpt, tmp_path, capsys, monkeypatch):
    """An exported file that does not reproduce eager is not written (and an older file is kept)."""
    out = tmp_path / "m.pt"
    out.write_bytes(b"older")
    monkeypatch.setitem(ex._RUNNERS, "torchscript", lambda path, x: torch.zeros(x.shape[0], 5) + 1e3)
    code, _, err = run_cli(["export", ckpt, "--format", "torchscript", "--out", out], capsys)
    assert code == 1 and "differs from eager" in err and "nothing written" in err
    assert out.read_bytes() == b"older" and [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def test_import_does_not_need_onnx():
    """`import nlvid.cli` (every command) loads none of the export extra's packages."""
    code = ("import sys, nlvid, nlvid.cli, nlvid.engine.export; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('onnx', 'onnxruntime', 'onnxscript')))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------ whole models (slow)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ex.FORMATS)
@pytest.mark.parametrize("inst", INSTS)
def test_model_every_instantiation_and_format(inst, fmt, tmp_path):
    """The tiny model with each instantiation exports to each format; batch 1 and 2 give eager's logits."""
    if fmt == "onnx":
        _ort()
    model = _randomise(create_model("tiny", num_classes=5, instantiation=inst))
    out = tmp_path / f"m{ex.SUFFIXES[fmt]}"
    r = ex.export_model(model, CLASSES, out, format=fmt, num_frames=8, stride=2, test_short_side=64,
                        test_crop_size=64, mean=(0.45,) * 3, std=(0.225,) * 3, model_name="tiny")
    assert r["nonlocal_impl"] == ("explicit" if inst == "concatenation" else "fast")
    for batch in (1, 2):
        x = torch.randn(batch, 3, 8, 64, 64)
        assert _rel(ex.run_exported(out, x, format=fmt), _eager(model, x)) < TOL, (inst, fmt, batch)
