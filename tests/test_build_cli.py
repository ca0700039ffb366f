"""`nlvid build`: summary table, --json, --out checkpoints, --init / --export, one-line errors with exit 2; the
CLI-wide behaviour of `main()`: --version, usage errors as one line, error text printed verbatim, flags named."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

import nlvid
from nlvid.cli import main
from nlvid.models import load_model
from nlvid.models import create_model

ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *args: str) -> tuple[int, str, str]:
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def test_table(capsys):
    code, out, err = run(capsys, "build", "tiny", "--frames", "8", "--size", "64")
    assert code == 0, err
    for text in ("tiny", "input 3x8x64x64", "res3.nl.0", "res4.nl.0", "pool2", "total", "Non-local blocks",
                 f"{sum(p.numel() for p in create_model('tiny').parameters()):,}"):
        assert text in out, text


def test_json_fields(capsys):
    code, out, err = run(capsys, "build", "c2d_r50_nl5", "--json", "--classes", "10", "--size", "112")
    assert code == 0, err
    d = json.loads(out)
    model = create_model("c2d_r50_nl5", num_classes=10)
    assert d["model"] == "c2d_r50_nl5" and d["num_classes"] == 10 and d["layout"] == "8x8"
    assert d["params"] == sum(p.numel() for p in model.parameters()) and isinstance(d["params"], int)
    assert isinstance(d["macs"], int) and d["macs"] > 0
    assert d["input"] == [3, 8, 112, 112]
    assert [n["name"] for n in d["nonlocal"]] == ["res3.nl.1", "res3.nl.3", "res4.nl.1", "res4.nl.3", "res4.nl.5"]
    n = d["nonlocal"][0]
    assert n["queries"] == 4 * 14 * 14 and n["keys"] == 4 * 7 * 7
    assert n["attention_bytes"] == n["queries"] * n["keys"] * 4
    assert {s["name"]: s["output"] for s in d["stages"]}["res5"] == [2048, 4, 4, 4]


def test_layout_set_and_config_file(capsys, tmp_path):
    code, out, _ = run(capsys, "build", "c2d_r18", "--layout", "32x2", "--frames", "32", "--size", "64", "--json",
                       "--set", "model.stem_pool_padding=0", "--set", "model.nonlocal_blocks={res4: [1]}")
    assert code == 0
    d = json.loads(out)
    assert d["layout"] == "32x2" and [n["name"] for n in d["nonlocal"]] == ["res4.nl.1"]
    assert {s["name"]: s["output"] for s in d["stages"]}["stem"] == [64, 8, 15, 15]
    cfg = tmp_path / "m.yaml"
    cfg.write_text("model:\n  name: c2d_r18_nl1\n  width: 8\ndata:\n  num_frames: 4\n  crop_size: 32\n")
    code, out, _ = run(capsys, "build", cfg, "--json")
    assert code == 0 and json.loads(out)["input"] == [3, 4, 32, 32]
    code, out, _ = run(capsys, "build", "c2d_r50_8x8_nl5", "--json", "--size", "64")  # a bundled config
    assert code == 0 and len(json.loads(out)["nonlocal"]) == 5


def test_out_checkpoint_loads(capsys, tmp_path):
    path = tmp_path / "tiny.pt"
    code, _, err = run(capsys, "build", "tiny", "--classes", "5", "--size", "64", "--out", path)
    assert code == 0, err
    assert "wrote" in err
    model, classes, cfg = load_model(path)
    assert classes == [f"class_{i}" for i in range(5)]
    assert cfg.model.name == "tiny" and cfg.model.num_classes == 5 and cfg.data.crop_size == 64
    assert model.head.fc.out_features == 5


def test_init_imagenet_and_export(capsys, tmp_path):
    tv = torchvision.models.resnet18(weights=None)
    tv_path = tmp_path / "r18.pth"
    torch.save(tv.state_dict(), tv_path)
    out = tmp_path / "c2d.pt"
    code, _, err = run(capsys, "build", "c2d_r18_nl5", "--init", f"imagenet={tv_path}", "--size", "64",
                       "--classes", "3", "--out", out, "--json")
    assert code == 0, err
    assert "inflated" in err and "Non-local" in err
    model, classes, _ = load_model(out)
    torch.testing.assert_close(model.res2.blocks[0].conv1.weight[:, :, 0], tv.state_dict()["layer1.0.conv1.weight"])
    convert = pytest.importorskip("nlvid.models.convert")
    fmt = sorted(convert.EXPORTERS)[0]
    dest = tmp_path / "exported.pyth"
    code, _, err = run(capsys, "build", "c2d_r50_nl5", "--size", "64", "--export", f"{fmt}={dest}", "--json")
    assert code == 0, err
    assert dest.exists() and dest.stat().st_size > 0
    if fmt in convert.IMPORTERS:  # round trip through build_with_init's importer path
        back = tmp_path / "back.pt"
        code, _, err = run(capsys, "build", "c2d_r50_nl5", "--size", "64", "--init", f"{fmt}={dest}", "--json",
                           "--classes", "3", "--out", back)
        assert code == 0, err
        assert "classifier re-initialised: the weights have 400 classes, 3 requested" in " ".join(err.split())
        model, classes, cfg = load_model(back)
        assert model.head.fc.out_features == 3 and classes == ["class_0", "class_1", "class_2"]
        assert cfg.model.nonlocal_blocks == {"res3": [1, 3], "res4": [1, 3, 5]}


@pytest.mark.parametrize("args,needle", [
    (["c2d_r51"], "unknown config or model 'c2d_r51'"),
    (["tiny", "--frames", "1"], "1 frames is too short for the temporal strides of layout 8x8 (needs >= 2 frames)"),
    (["c2d_r50", "--layout", "32x2", "--frames", "4"], "needs >= 7 frames"),
    (["c2d_r50", "--set", "model.stem_pool_padding=0", "--size", "3"], "3x3 is too small"),
    (["tiny", "--set", "model.colour=red"], "unknown config key 'model.colour'"),
    (["tiny", "--set", "model.nonlocal_blocks={res3: [3]}"], "res3 has 1 blocks (allowed 0..0)"),
    (["tiny", "--layout", "4x16"], "'4x16' is not one of 8x8, 32x2"),
    (["tiny", "--init", "resnet.pth"], "expected FORMAT=PATH"),
    (["tiny", "--init", "tf=resnet.pth"], "unknown format 'tf'; allowed: imagenet, nlvid"),
    (["tiny", "--export", "onnx=x.onnx"], "unknown format 'onnx'"),
    (["tiny", "--classes", "0"], "must be a positive integer"),
])
def test_errors_exit_2_with_one_line(capsys, args, needle):
    code, out, err = run(capsys, "build", *args)
    assert code == 2, (code, err)
    assert needle in " ".join(err.split()), err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 2  # one message (rich may wrap it)


def test_missing_weights_file_exit_1(capsys, tmp_path):
    code, _, err = run(capsys, "build", "tiny", "--init", f"imagenet={tmp_path / 'none.pth'}")
    assert code == 1 and "weights file not found" in err


def test_subprocess_entry_point():
    proc = subprocess.run([sys.executable, "-m", "nlvid", "build", "no_such_model"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: unknown config or model 'no_such_model'")
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_version(capsys):
    code, out, err = run(capsys, "--version")
    assert code == 0, err
    assert out.strip() == f"nlvid {nlvid.__version__} (torch {torch.__version__})"


@pytest.mark.parametrize("args,needle", [
    (["build", "tiny", "--view", "x"], "No such option: --view"),
    (["visualize", "clip.mp4", "--view", "side"], "'side' is not one of full, center"),
    (["build", "tiny", "--export", "pyslowfast"], "expected FORMAT=FILE"),
    (["predict", "clip.mp4", "-c", "x.pt"], "No such option: -c"),  # -c is --config (train); --checkpoint is long
])
def test_usage_errors_exit_2_with_one_line(capsys, args, needle):
    code, out, err = run(capsys, *args)
    assert code == 2, (code, err)
    assert err.startswith("error: ") and needle in err
    assert len(err.strip().splitlines()) == 1 and out == ""


def test_error_lines_print_file_names_verbatim(capsys, tmp_path):
    """Rich markup in user text is printed as text: by main() and by predict's per-file error lines."""
    ckpt = tmp_path / "a[bold]b.pt"
    code, _, err = run(capsys, "predict", "clip.mp4", "--checkpoint", ckpt)
    assert code == 1 and f"error: {ckpt}: " in err
    real = tmp_path / "tiny.pt"
    code, _, err = run(capsys, "build", "tiny", "--classes", "2", "--frames", "4", "--size", "32", "--out", real)
    assert code == 0, err
    clip = tmp_path / "a[bold]b.mp4"
    code, _, err = run(capsys, "predict", clip, "--checkpoint", real)
    assert code == 1 and f"error: {clip}: file not found" in err


def test_error_names_the_flag_of_the_key(capsys, tmp_path):
    """An NlvidError keyed with a config key ends with the flag that sets it in the running command."""
    code, _, err = run(capsys, "predict", "clip.mp4", "--checkpoint", tmp_path / "x.pt", "--device", "nope")
    assert code == 2 and err.strip() == "error: device 'nope' is not valid; use auto, cpu, cuda or cuda:N (--device)"
    real = tmp_path / "tiny.pt"
    code, _, err = run(capsys, "build", "tiny", "--classes", "2", "--frames", "4", "--size", "32", "--out", real)
    assert code == 0, err
    code, _, err = run(capsys, "predict", "clip.mp4", "--checkpoint", real, "--segments", "-1")
    assert code == 2 and "must be a positive number of seconds (--segments)" in err
