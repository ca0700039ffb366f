"""Every command against a table of hostile inputs: the error contract holds.

For each case: exit code 1 (runtime) or 2 (usage/config) as documented, exactly one `error:` line on stderr and
nothing that looks like a traceback, no temp file left behind, and no marker file created by a code-carrying
payload. Inputs are generated here: corrupt and code-carrying files, out-of-range and non-finite config values,
odd names with rich markup in them, outputs that cannot be written.
"""

from __future__ import annotations

import math
import os
import pickle
import stat
from pathlib import Path

import pytest
import torch

from cli_helpers import run_cli  # tests/cli_helpers.py
from nlvid.checkpoint import save_checkpoint
from nlvid.config import RANGES, load_config
from nlvid.data import write_synthetic
from nlvid.models import create_model

# --------------------------------------------------------------------------------------------- hostile files


class _Payload:
    """Unpickling this runs code: it creates the marker file. nlvid must never unpickle it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Files the cases point at (module-scoped: made once)."""
    d = tmp_path_factory.mktemp("hostile")
    w: dict[str, Path] = {"dir": d, "marker": d / "PAYLOAD_RAN"}
    cfg = load_config("tiny", ["model.num_classes=3"])
    torch.manual_seed(0)
    model = create_model("tiny", num_classes=3)
    good = model.state_dict()
    w["ckpt"] = d / "good.pt"
    save_checkpoint(w["ckpt"], model_state=good, config=cfg.to_dict(), classes=["a", "b", "c"])

    def ckpt(name: str, **obj) -> None:
        base = {"format": "nlvid", "version": "0", "model": good, "config": cfg.to_dict(), "classes": ["a", "b", "c"],
                "epoch": 0, "step": 0}
        base.update(obj)
        torch.save({k: v for k, v in base.items() if v is not None}, d / name)
        w[name] = d / name

    ckpt("no_config.pt", config=None)
    ckpt("no_classes.pt", classes=None)
    ckpt("wrong_classes.pt", classes=["a", "b"])
    ckpt("classes_not_str.pt", classes=[1, 2, 3])
    ckpt("bad_config_value.pt", config=dict(cfg.to_dict(), data=dict(cfg.to_dict()["data"], num_frames=10**6)))
    ckpt("negative_step.pt", step=-3)
    nan_state = {k: v.clone() for k, v in good.items()}
    nan_state["head.fc.weight"][0, 0] = float("nan")
    ckpt("nan_weights.pt", model=nan_state)
    ckpt("model_not_dict.pt", model=[1, 2, 3])
    torch.save({"format": "nlvid", "model": good, "config": cfg.to_dict(), "classes": ["a", "b", "c"],
                "evil": _Payload(w["marker"])}, d / "payload.pt")
    w["payload.pt"] = d / "payload.pt"
    (d / "payload.pkl").write_bytes(pickle.dumps({"blobs": _Payload(w["marker"])}, protocol=2))
    w["payload.pkl"] = d / "payload.pkl"
    (d / "empty.pt").write_bytes(b"")
    w["empty.pt"] = d / "empty.pt"
    data = w["ckpt"].read_bytes()
    (d / "truncated.pt").write_bytes(data[: len(data) // 2])
    w["truncated.pt"] = d / "truncated.pt"
    (d / "text.pt").write_text("not a checkpoint\n")
    w["text.pt"] = d / "text.pt"
    (d / "a[bold]b.pt").write_bytes(b"junk")
    w["markup.pt"] = d / "a[bold]b.pt"
    torch.save({"weights": torch.zeros(3)}, d / "foreign.pt")
    w["foreign.pt"] = d / "foreign.pt"
    w["folder.pt"] = d / "folder.pt"
    w["folder.pt"].mkdir()

    # videos
    (d / "text.mp4").write_text("not a video")
    w["text.mp4"] = d / "text.mp4"
    (d / "empty.mp4").write_bytes(b"")
    w["empty.mp4"] = d / "empty.mp4"
    w["missing.mp4"] = d / "missing.mp4"
    w["markup.mp4"] = d / "[red]x[/red].mp4"
    (d / "garbage.mp4").write_bytes(os.urandom(4096))
    w["garbage.mp4"] = d / "garbage.mp4"

    # datasets
    data_root = d / "synth"
    write_synthetic(data_root, classes=2, clips_per_class=2, seed=0)
    w["data"] = data_root
    w["clip"] = next((data_root / "train").rglob("*.mp4"))
    empty = d / "empty_data"
    (empty / "cls").mkdir(parents=True)
    w["empty_data"] = empty
    unreadable = d / "unreadable_data"
    (unreadable / "cls").mkdir(parents=True)
    (unreadable / "cls" / "x.mp4").write_text("no video")
    w["unreadable_data"] = unreadable
    clip_rel = os.path.relpath(w["clip"], d)

    def lst(name: str, text: str) -> None:
        (d / name).write_text(text)
        w[name] = d / name

    lst("huge_label.csv", f"{clip_rel},0\n{clip_rel}x,1\n")
    (d / f"{clip_rel}x").write_bytes(w["clip"].read_bytes())
    lst("huge_index.csv", f"{clip_rel},100000000000\n")
    lst("gap_labels.csv", f"{clip_rel},0\n{clip_rel}x,5\n")
    lst("conflict.csv", f"{clip_rel},0\n{clip_rel},1\n")
    lst("missing_video.csv", "nope.mp4,0\n")
    lst("header_only.csv", "path,label\n")
    lst("one_field.csv", f"{clip_rel}\n")
    lst("mixed_labels.csv", f"{clip_rel},0\n{clip_rel}x,cat\n")
    (d / "latin1.csv").write_bytes("vid\xe9o.mp4,0\n".encode("latin-1"))
    w["latin1.csv"] = d / "latin1.csv"

    # outputs that cannot be written
    (d / "a_file").write_text("I am a file")
    w["a_file"] = d / "a_file"
    w["read_only"] = _read_only_folder(d)
    return w


def _read_only_folder(d: Path) -> Path:
    """A folder nobody may write into. Root ignores permission bits, so as root take one under /sys (not writable
    even for root here); elsewhere a folder with mode r-x."""
    if os.geteuid() != 0:
        ro = d / "read_only"
        ro.mkdir()
        ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
        return ro
    ro = Path("/sys")
    probe = ro / "nlvid-write-probe"
    try:
        probe.mkdir()
    except OSError:
        return ro
    probe.rmdir()
    pytest.skip("no read-only folder available as root on this machine")


# --------------------------------------------------------------------------------------------- the cases


def _range_cases() -> list[tuple[str, list[str], int]]:
    """Every ranged config key just outside its range, and every float key as nan / inf, through `build --set`."""
    floats = {"model.dropout", "data.std", "optim.lr", "optim.momentum", "optim.weight_decay", "optim.warmup_epochs",
              "optim.warmup_start_factor", "optim.milestones", "optim.gamma", "optim.label_smoothing",
              "optim.clip_grad_norm"}
    lists = {"data.train_short_side", "data.std", "optim.milestones"}
    out = []
    for key, (lo, hi) in RANGES.items():
        for bad in ([lo - (1 if isinstance(lo, int) else 0.5)] if lo is not None else []) + \
                   ([hi * 2 + 1] if hi is not None else []):
            if key in floats:
                bad = float(bad)
            value = f"[{bad}, {bad}]" if key == "data.train_short_side" else (
                f"[{bad}, {bad}, {bad}]" if key == "data.std" else (f"[{bad}]" if key in lists else str(bad)))
            out.append((f"range {key}={bad}", ["build", "tiny", "--set", f"{key}={value}"], 2))
        if key in floats:
            for bad in (".nan", ".inf", "-.inf"):
                value = f"[{bad}, {bad}, {bad}]" if key == "data.std" else (f"[{bad}]" if key in lists else bad)
                out.append((f"non-finite {key}={bad}", ["build", "tiny", "--set", f"{key}={value}"], 2))
    out += [
        ("mean of 2 values", ["build", "tiny", "--set", "data.mean=[0.4, 0.4]"], 2),
        ("std of 4 values", ["build", "tiny", "--set", "data.std=[0.2, 0.2, 0.2, 0.2]"], 2),
        ("short side min > max", ["build", "tiny", "--set", "data.train_short_side=[300, 200]"], 2),
        ("num_crops 2", ["build", "tiny", "--set", "data.num_crops=2"], 2),
        ("pool size of 2", ["build", "tiny", "--set", "model.pool_size=[1, 2]"], 2),
        ("10000 frames", ["build", "tiny", "--set", "data.num_frames=1000", "--set", "train.batch_size=10000"], 2),
        ("lr as text", ["build", "tiny", "--set", "optim.lr=fast"], 2),
        ("epochs as float", ["build", "tiny", "--set", "train.epochs=1.5"], 2),
        ("bool as int", ["build", "tiny", "--set", "train.compile=1"], 2),
        ("unknown section", ["build", "tiny", "--set", "nope.x=1"], 2),
        ("unknown key with markup", ["build", "tiny", "--set", "model.[bold]x=1"], 2),
        ("set without =", ["build", "tiny", "--set", "optim.lr"], 2),
        ("set bad yaml", ["build", "tiny", "--set", "optim.lr=[1,"], 2),
        ("mapping for a number", ["build", "tiny", "--set", "optim.lr={a: 1}"], 2),
        ("instantiation choice", ["build", "tiny", "--set", "model.instantiation=softmax"], 2),
        ("amp choice", ["build", "tiny", "--set", "train.amp=fp8"], 2),
        ("unknown preset", ["build", "c2d_r51"], 2),
        ("preset with markup", ["build", "[bold]x"], 2),
        ("frames 0", ["build", "tiny", "--frames", "0"], 2),
        ("size 0", ["build", "tiny", "--size", "0"], 2),
        ("classes 0", ["build", "tiny", "--classes", "0"], 2),
        ("layout unknown", ["build", "tiny", "--layout", "4x16"], 2),
        ("unknown option", ["build", "tiny", "--colour", "red"], 2),
        ("missing argument", ["build"], 2),
        ("config file missing", ["build", "nope.yaml"], 2),
    ]
    return out


def _file_cases(w: dict[str, Path]) -> list[tuple[str, list[str], int]]:
    ck, clip, data = str(w["ckpt"]), str(w["clip"]), str(w["data"])
    bad_ckpts = {  # file -> exit code
        "no_config.pt": 1, "no_classes.pt": 1, "wrong_classes.pt": 1, "classes_not_str.pt": 1,
        "bad_config_value.pt": 1, "negative_step.pt": 1, "nan_weights.pt": 1, "model_not_dict.pt": 1,
        "payload.pt": 1, "empty.pt": 1, "truncated.pt": 1, "text.pt": 1, "markup.pt": 1, "foreign.pt": 1,
        "folder.pt": 1, "missing.pt": 1,
    }
    out = []
    for name, code in bad_ckpts.items():
        path = str(w.get(name, w["dir"] / name))
        out += [
            (f"eval {name}", ["eval", path, data], code),
            (f"predict {name}", ["predict", clip, "--checkpoint", path], code),
            (f"visualize {name}", ["visualize", clip, "--checkpoint", path, "--json"], code),
            (f"build --init nlvid={name}", ["build", "tiny", "--init", f"nlvid={path}"], code),
        ]
    for name in ("payload.pt", "empty.pt", "truncated.pt", "text.pt", "markup.pt", "folder.pt", "missing.pt"):
        path = str(w.get(name, w["dir"] / name))
        out += [(f"build --init {fmt}={name}", ["build", "tiny", "--init", f"{fmt}={path}"], 1)
                for fmt in ("imagenet", "pyslowfast", "mmaction2")]
    for name in ("payload.pkl", "text.pt", "empty.pt", "missing.pt"):
        path = str(w.get(name, w["dir"] / name))
        out.append((f"build --init caffe2={name}", ["build", "c2d_r50", "--init", f"caffe2={path}"], 1))
    for name in ("text.mp4", "empty.mp4", "missing.mp4", "markup.mp4", "garbage.mp4"):
        path = str(w[name])
        out += [(f"predict {name}", ["predict", path, "--checkpoint", ck], 1),
                (f"visualize {name}", ["visualize", path, "--checkpoint", ck, "--json"], 1)]
    out += [
        ("predict a folder", ["predict", str(w["dir"]), "--checkpoint", ck], 1),
        ("predict clips 0", ["predict", clip, "--checkpoint", ck, "--clips", "0"], 2),
        ("predict clips out of range", ["predict", clip, "--checkpoint", ck, "--clips", "5000"], 2),
        ("predict crops 2", ["predict", clip, "--checkpoint", ck, "--crops", "2"], 2),
        ("predict segments negative", ["predict", clip, "--checkpoint", ck, "--segments", "-1"], 2),
        ("predict topk 0", ["predict", clip, "--checkpoint", ck, "--topk", "0"], 2),
        ("predict bad device", ["predict", clip, "--checkpoint", ck, "--device", "tpu"], 2),
        ("predict cuda absent", ["predict", clip, "--checkpoint", ck, "--device", "cuda"], 2),
        ("visualize query 2 parts", ["visualize", clip, "--checkpoint", ck, "--query", "1,2"], 2),
        ("visualize query text", ["visualize", clip, "--checkpoint", ck, "--query", "a,b,c"], 2),
        ("visualize query frame", ["visualize", clip, "--checkpoint", ck, "--query", "99,1,1"], 2),
        ("visualize query outside", ["visualize", clip, "--checkpoint", ck, "--query", "0,9999,1"], 2),
        ("visualize bad block", ["visualize", clip, "--checkpoint", ck, "--block", "res9.nl.0"], 2),
        ("visualize bad view", ["visualize", clip, "--checkpoint", ck, "--view", "side"], 2),
        ("visualize out is a file", ["visualize", clip, "--checkpoint", ck, "--out", str(w["a_file"])], 1),
        ("visualize out read-only", ["visualize", clip, "--checkpoint", ck, "--out", str(w["read_only"] / "v")], 1),
        ("eval data missing", ["eval", ck, str(w["dir"] / "nope")], 1),
        ("eval empty data", ["eval", ck, str(w["empty_data"])], 1),
        ("eval unreadable data", ["eval", ck, str(w["unreadable_data"])], 1),
        ("eval clips 0", ["eval", ck, data, "--clips", "0"], 2),
        ("eval crops 2", ["eval", ck, data, "--crops", "2"], 2),
        ("eval out is a file", ["eval", ck, data, "--out", str(w["a_file"] / "x")], 1),
        ("build out is a file", ["build", "tiny", "--out", str(w["a_file"] / "m.pt")], 1),
        ("build out read-only", ["build", "tiny", "--out", str(w["read_only"] / "m.pt")], 1),
        ("build export read-only", ["build", "tiny", "--export", f"pyslowfast={w['read_only'] / 'm.pyth'}"], 1),
        ("synth out is a file", ["synth", str(w["a_file"] / "d"), "--classes", "2", "--clips-per-class", "1"], 1),
        ("synth read-only", ["synth", str(w["read_only"] / "d"), "--classes", "2", "--clips-per-class", "1"], 1),
        ("synth 0 clips", ["synth", str(w["dir"] / "s0"), "--clips-per-class", "0"], 2),
        ("train data missing", ["train", str(w["dir"] / "nope"), "--out", str(w["dir"] / "r1")], 1),
        ("train empty data", ["train", str(w["empty_data"]), "--out", str(w["dir"] / "r2")], 1),
        ("train unreadable data", ["train", str(w["unreadable_data"]), "--out", str(w["dir"] / "r3")], 1),
        ("train epochs -1", ["train", data, "--out", str(w["dir"] / "r4"), "--set", "train.epochs=-1"], 2),
        ("train lr nan", ["train", data, "--out", str(w["dir"] / "r5"), "--set", "optim.lr=.nan"], 2),
        ("train workers -1", ["train", data, "--out", str(w["dir"] / "r6"), "--set", "data.num_workers=-1"], 2),
        ("train frames 1", ["train", data, "--out", str(w["dir"] / "r7"), "--set", "data.num_frames=1"], 2),
        ("train init payload", ["train", data, "--out", str(w["dir"] / "r8"), "--init",
                                f"nlvid={w['payload.pt']}"], 1),
        ("train out is a file", ["train", data, "--out", str(w["a_file"] / "run")], 1),
        ("train resume without out", ["train", data, "--resume"], 2),
    ]
    for name, code in (("huge_label.csv", None), ("huge_index.csv", 1), ("gap_labels.csv", 1), ("conflict.csv", 1),
                       ("missing_video.csv", 1), ("header_only.csv", 1), ("one_field.csv", 1),
                       ("mixed_labels.csv", 1), ("latin1.csv", 1)):
        if code is not None:
            out.append((f"train list {name}", ["train", str(w[name]), "--out", str(w["dir"] / f"run_{name}")], code))
            out.append((f"eval list {name}", ["eval", ck, str(w[name])], code))
    return out


def _all_cases(w):
    return _range_cases() + _file_cases(w)


def test_the_table_is_large():
    n = len(_range_cases()) + len(_file_cases({k: Path("/x") for k in _WORLD_KEYS}))
    assert n >= 150, n


_WORLD_KEYS = ["dir", "marker", "ckpt", "no_config.pt", "no_classes.pt", "wrong_classes.pt", "classes_not_str.pt",
               "bad_config_value.pt", "negative_step.pt", "nan_weights.pt", "model_not_dict.pt", "payload.pt",
               "payload.pkl", "empty.pt", "truncated.pt", "text.pt", "markup.pt", "foreign.pt", "folder.pt",
               "text.mp4", "empty.mp4", "missing.mp4", "markup.mp4", "garbage.mp4", "data", "clip", "empty_data",
               "unreadable_data", "huge_label.csv", "huge_index.csv", "gap_labels.csv", "conflict.csv",
               "missing_video.csv", "header_only.csv", "one_field.csv", "mixed_labels.csv", "latin1.csv", "a_file",
               "read_only"]


def _case_ids():
    fake = {k: Path("/x") for k in _WORLD_KEYS}
    return [c[0] for c in _range_cases() + _file_cases(fake)]


@pytest.mark.parametrize("case", _case_ids())
def test_hostile_input_keeps_the_contract(case, world, capsys):
    name, argv, want = next(c for c in _all_cases(world) if c[0] == case)
    before = {p for p in world["dir"].rglob("*")}
    code, out, err = run_cli(argv, capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert code == want, (argv, code, err)
    assert len(errors) == 1, (argv, err)
    assert "Traceback" not in err and "Traceback" not in out, err
    assert not world["marker"].exists(), "a payload ran"
    left = [p for p in world["dir"].rglob("*") if p not in before and p.name.endswith(".tmp")]
    assert not left, left
    partial = [p for p in world["dir"].rglob("*") if p not in before and ".partial-" in p.name]
    assert not partial, partial
    for markup in ("[bold]", "[red]"):  # user text is shown as it is, never interpreted
        if any(markup in a for a in argv) and markup in "".join(argv[1:2]):
            assert markup in errors[0], errors[0]


FULL_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv.pop(1)),) * 2)
from nlvid.cli import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize("what", ["build", "synth"])
def test_full_disk_is_one_line_and_leaves_nothing_half_written(what, tmp_path):
    """A file-size limit makes writes past a few kB fail, as a full disk would."""
    import subprocess
    import sys

    out = tmp_path / "out"
    argv = (["build", "tiny", "--out", str(out / "m.pt")] if what == "build"
            else ["synth", str(out / "data"), "--classes", "2", "--clips-per-class", "2"])
    limit = "20000" if what == "build" else "3000"  # a tiny checkpoint is ~1.5 MB; one synthetic clip a few kB
    proc = subprocess.run([sys.executable, "-c", FULL_DISK, limit, *argv], capture_output=True, text=True,
                          timeout=300)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert leftovers == [], leftovers  # no half checkpoint, no partial dataset, no temp file


def test_json_outputs_stay_valid_json_and_finite(world, capsys):
    """predict --json of a real clip: parseable by a strict parser (no bare NaN)."""
    import json

    code, out, err = run_cli(["predict", str(world["clip"]), "--checkpoint", str(world["ckpt"]), "--json",
                              "--clips", "1", "--crops", "1"], capsys)
    assert code == 0, err

    def strict(x):
        raise ValueError(f"not JSON: {x}")

    data = json.loads(out, parse_constant=strict)
    assert all(math.isfinite(t["prob"]) for r in data for t in r["top"])


# --------------------------------------------------------------------------------------------- single defects


def test_python3_protocol2_caffe2_pickle_is_read_and_a_payload_still_refused(tmp_path, world):
    import numpy as np

    from nlvid.errors import CheckpointError
    from nlvid.models.convert import read_caffe2_pickle

    good = tmp_path / "p3.pkl"
    good.write_bytes(pickle.dumps({"blobs": {"conv1_w": np.arange(6, dtype=np.float32).reshape(2, 3)}}, protocol=2))
    blobs = read_caffe2_pickle(good)
    assert blobs["conv1_w"].tolist() == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(CheckpointError, match="refused to load global"):
        read_caffe2_pickle(world["payload.pkl"])
    assert not world["marker"].exists()


def test_checkpoint_files_get_the_usual_mode_and_killed_writes_are_cleaned(tmp_path):
    from nlvid.checkpoint import atomic_save

    target = tmp_path / "last.pt"
    dead = tmp_path / ".last.pt.999999999.abc.tmp"  # left by a writer that was killed (no such pid)
    dead.write_bytes(b"half")
    mine = tmp_path / f".last.pt.{os.getpid()}.xyz.tmp"  # another write of this process: left alone
    mine.write_bytes(b"in flight")
    atomic_save({"x": torch.zeros(2)}, target)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    assert not dead.exists() and mine.exists()


def test_scan_cache_entries_from_elsewhere_are_probed_again(world, tmp_path):
    import json
    import shutil

    from nlvid.data import scan_dataset

    root = tmp_path / "d"
    shutil.copytree(world["data"] / "train", root)
    first = scan_dataset(root)
    cache = root / ".nlvid_scan.json"
    data = json.loads(cache.read_text())
    for rec in data["files"].values():  # what another version (or a hand edit) might have left
        rec["info"] = {"duration": "long", "frames": 3}
    cache.write_text(json.dumps(data))
    again = scan_dataset(root)
    assert again.probed == len(first.items) and [p for p, _ in again.items] == [p for p, _ in first.items]


def test_rerunning_a_finished_run_keeps_its_history(world, tmp_path, capsys):
    import json

    out = tmp_path / "run"
    argv = ["train", str(world["data"]), "--out", str(out), "--set", "train.epochs=2", "--set", "train.log_every=1",
            "--set", "data.num_workers=0"]
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    before = (out / "metrics.jsonl").read_text()
    assert sum('"kind": "epoch"' in ln for ln in before.splitlines()) == 2
    code, _, err = run_cli(argv, capsys)  # finished: nothing to train, nothing lost
    assert code == 0, err
    assert (out / "metrics.jsonl").read_text() == before
    # resumed from its end-of-epoch checkpoint with one more epoch: the finished epochs' records all stay
    code, _, err = run_cli(argv[:-4] + ["--set", "train.epochs=3", "--set", "data.num_workers=0"], capsys)
    assert code == 0, err
    after = (out / "metrics.jsonl").read_text()
    assert after.startswith(before)
    epochs = [json.loads(ln)["epoch"] for ln in after.splitlines() if '"kind": "epoch"' in ln]
    assert epochs == [1, 2, 3]
