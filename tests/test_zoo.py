"""Pretrained weights by name (nlvid.models.zoo / hub, `--pretrained`, `nlvid models`), without internet: a loopback
HTTP server serves format-exact fixture files (tests/fixtures_convert.py writers, small-width models) through
NLVID_ZOO_MIRROR. Also the NL grouping option (model.nonlocal_group) the official frozen-BN models need."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import http.server
import json
import re
import socket
import threading
from pathlib import Path

import pytest
import torch

from cli_helpers import run_cli
from fixtures_convert import clip, small_model, write_caffe2_pkl, write_mmaction2_pth
from nlvid.checkpoint import load_checkpoint
from nlvid.config import ModelConfig, config_from_dict
from nlvid.errors import CheckpointError, ConfigError
from nlvid.models import NonLocalBlock, create_model, load_state_dict_checked
from nlvid.models import hub, zoo
from nlvid.models.convert import IMPORTERS, kinetics400_classes, sniff_format
from nlvid.models.presets import PRESETS
from nlvid.models.resnet3d import run_grouped

# ----------------------------------------------------------------------------------------------------------------
# NL groups (PySlowFast NONLOCAL.GROUP / the official add_nonlocal_group)
# ----------------------------------------------------------------------------------------------------------------


def _active_block(dim: int = 16, **kw) -> NonLocalBlock:
    torch.manual_seed(0)
    blk = NonLocalBlock(dim, **kw).eval()
    with torch.no_grad():
        for p in blk.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return blk


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_grouped_nl_equals_the_block_on_each_chunk(groups):
    blk = _active_block(norm="none")
    x = torch.randn(2, 16, 8, 5, 6)
    with torch.no_grad():
        got = run_grouped(blk, x, groups)
        step = 8 // groups
        want = torch.cat([blk(x[:, :, i * step:(i + 1) * step]) for i in range(groups)], dim=2)
    assert torch.allclose(got, want, atol=1e-5)
    if groups > 1:  # and it is not the ungrouped block
        assert not torch.allclose(got, blk(x), atol=1e-4)


def test_model_nonlocal_group_runs_res3_blocks_on_chunks():
    kw = dict(width=8, num_classes=5, nonlocal_blocks={"res3": [1]}, norm="none")
    grouped = create_model("c2d_r50", nonlocal_group={"res3": 2}, **kw).eval()
    plain = create_model("c2d_r50", **kw).eval()
    plain.load_state_dict(grouped.state_dict())
    with torch.no_grad():
        for p in grouped.res3.nl.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        plain.load_state_dict(grouped.state_dict())
        x = clip(frames=8, size=32)
        feats = plain.res2(plain.stem(x.contiguous(memory_format=torch.channels_last_3d)))
        r3_in = plain.pool2(feats)
        y = r3_in
        for i, b in enumerate(plain.res3.blocks):
            y = b(y)
            if i == 1:  # the block on each 2-frame chunk of the 4 res3 frames
                y = torch.cat([plain.res3.nl["1"](y[:, :, :2]), plain.res3.nl["1"](y[:, :, 2:])], dim=2)
        want = plain.head(plain.res5(plain.res4(y)))
        assert torch.allclose(grouped(x), want, atol=1e-4)
        assert not torch.allclose(plain(x), want, atol=1e-4)
    with pytest.raises(ConfigError, match="nonlocal_group"):
        grouped.check_input((1, 3, 6, 32, 32))  # 3 res3 frames: not 2 groups
    with pytest.raises(ConfigError, match="nonlocal_group"):
        create_model("c2d_r50", nonlocal_group={"res9": 2})


def test_caffe2_frozen_bn_32x4_sets_nonlocal_group(tmp_path):
    ref = small_model("i3d_r50_nl5", seed=3, norm="none", stem_pool_padding=0, nonlocal_group={"res3": 4})
    path = write_caffe2_pkl(ref, tmp_path / "i3d_nonlocal_32x4_I3D_pretrain_400k.pkl", frozen_bn=True)
    res = IMPORTERS["caffe2"](path, ModelConfig(name="i3d_r50_nl5"))
    assert res.model_cfg.nonlocal_group == {"res3": 4}
    assert res.data == {"num_frames": 32, "stride": 4}
    assert any("nonlocal_group" in line for line in res.report)
    model = create_model("i3d_r50_nl5", **{k: v for k, v in dataclasses.asdict(res.model_cfg).items()
                                           if k != "name" and v is not None}).eval()
    load_state_dict_checked(model, res.state_dict)
    x = clip(frames=32, size=32)
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), atol=1e-4)


def test_sniff_format_reads_bytes_not_extension(tmp_path):
    torch.save({"a": torch.zeros(1)}, tmp_path / "x.pkl")
    (tmp_path / "y.pth").write_bytes(b"\x80\x02}q\x00.")
    (tmp_path / "z.pkl").write_bytes(b"<html>404</html>")
    assert sniff_format(tmp_path / "x.pkl") == "zip"
    assert sniff_format(tmp_path / "y.pth") == "pickle"
    with pytest.raises(CheckpointError, match="not a weights file"):
        sniff_format(tmp_path / "z.pkl")


# ----------------------------------------------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------------------------------------------


def test_registry_entries_are_complete_and_consistent():
    entries = zoo.list_entries()
    names = {e.name for e in entries}
    for file in ("c2d_nonlocal_8x8_IN_pretrain_400k.pkl", "i3d_nonlocal_32x2_IN_pretrain_400k.pkl",
                 "i3d_nonlocal_32x4_I3D_pretrain_400k.pkl", "i3d_nonlocal_128x1_I3D_pretrain_400k.pkl",
                 "i3d_baseline_128x1_I3D_pretrain_400k.pkl", "I3D_NLN_8x8_R50.pkl", "I3D_8x8_R50.pkl",
                 "C2D_NOPOOL_8x8_R50.pkl", "resnet50-0676ba61.pth", "resnet18-f37072fd.pth"):
        assert zoo.get_entry(file).file_name == file
    assert sum(e.format == "mmaction2" for e in entries) == 4
    assert {f"torchvision_resnet{d}" for d in (18, 34, 50, 101)} <= names
    for e in entries:
        assert e.format in zoo.FORMATS and e.preset in PRESETS
        assert all(u.startswith("https://") for u in e.urls)
        config_from_dict({"model": dict(name=e.preset, **e.model), "data": e.data})  # valid config values
        if e.format in ("mmaction2", "imagenet"):  # the SHA-256 prefix is in the published name
            assert re.search(rf"-{e.sha256}\.pth$", e.file_name)
        if e.origin == "video-nonlocal-net":
            assert e.urls[0].startswith("https://dl.fbaipublicfiles.com/video-nonlocal/")
            assert e.urls[1].startswith("https://s3.amazonaws.com/video-nonlocal/") and e.license == "CC-BY-NC-4.0"
    assert zoo.get_entry("vnl_i3d_r50_nl_frozenbn_128x1").model["nonlocal_group"] == {"res3": 4}


def test_unknown_name_suggests_closest(capsys):
    with pytest.raises(ConfigError, match="closest: .*pysf_i3d_r50_nl_8x8"):
        zoo.get_entry("pysf_i3d_nl_8x8")
    code, _, err = run_cli(["predict", "x.mp4", "--pretrained", "i3d_nl_8x8"], capsys)
    assert code == 2 and "closest" in err and len(err.strip().splitlines()) == 1


def test_models_command_lists_every_entry(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("NLVID_HOME", str(tmp_path))
    code, out, _ = run_cli(["models", "--json"], capsys)
    assert code == 0
    rows = json.loads(out)
    assert [r["name"] for r in rows] == list(zoo.REGISTRY)
    assert all(r["cached"] == "no" and r["license"] for r in rows)
    code, out, _ = run_cli(["models"], capsys)
    assert code == 0 and "pysf_i3d_r50_nl_8x8" in out and "CC-BY-NC-4.0" in out


# ----------------------------------------------------------------------------------------------------------------
# A loopback server
# ----------------------------------------------------------------------------------------------------------------


class Server:
    """Serves `files` (path -> bytes) on 127.0.0.1 with Range support; `drop` (paths) sends half and hangs up on
    the first GET of each; `requests` records (path, Range header or None, status)."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.drop: set[str] = set()
        self.slow = 0.0
        self.requests: list[tuple[str, str | None, int]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                data = outer.files.get(self.path)
                rng = self.headers.get("Range")
                if data is None:
                    outer.requests.append((self.path, rng, 404))
                    self.send_error(404)
                    return
                start = 0
                if rng:
                    start = int(re.match(r"bytes=(\d+)-", rng)[1])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if self.path in outer.drop:
                    outer.drop.discard(self.path)
                    outer.requests.append((self.path, rng, -1))
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                outer.requests.append((self.path, rng, 206 if rng else 200))
                if outer.slow:
                    for i in range(0, len(body), 1 << 16):
                        self.wfile.write(body[i:i + (1 << 16)])
                        threading.Event().wait(outer.slow)
                else:
                    self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def gets(self, path: str) -> list[tuple[str, str | None, int]]:
        return [r for r in self.requests if r[0] == path]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


@pytest.fixture
def home(tmp_path, monkeypatch, server):
    monkeypatch.setenv("NLVID_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NLVID_ZOO_MIRROR", server.url)
    monkeypatch.delenv("NLVID_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "BACKOFF_S", 0.0)
    monkeypatch.setattr(hub, "TIMEOUT_S", 10.0)
    return tmp_path / "home"


PYSF_FILE = "I3D_NLN_8x8_R50.pkl"


@pytest.fixture(scope="module")
def pysf_bytes(tmp_path_factory) -> bytes:
    """PySlowFast's model-zoo I3D NL file, format-exact (Caffe2 pickle), at width 8 (R50 structure)."""
    path = tmp_path_factory.mktemp("zoo") / PYSF_FILE
    return write_caffe2_pkl(small_model("i3d_r50_nl5", seed=5), path).read_bytes()


def _entry(monkeypatch, name="test_pysf", **changes) -> zoo.ZooEntry:
    """A registry entry like pysf_i3d_r50_nl_8x8 (a primary and a mirror URL) with small test views."""
    base = zoo.get_entry("pysf_i3d_r50_nl_8x8")
    entry = dataclasses.replace(
        base, name=name, urls=(f"https://primary.invalid/a/{PYSF_FILE}", f"https://mirror.invalid/b/{PYSF_FILE}"),
        data=dict(base.data, stride=2, test_short_side=32, test_crop_size=32, num_clips=1, num_crops=1), **changes)
    monkeypatch.setitem(zoo.REGISTRY, name, entry)
    return entry


def _files(home: Path) -> list[str]:
    return sorted(p.name for p in (home / "downloads").iterdir()) if (home / "downloads").exists() else []


# ----------------------------------------------------------------------------------------------------------------
# Download -> verify -> convert -> predict
# ----------------------------------------------------------------------------------------------------------------


def test_predict_pretrained_downloads_converts_and_caches(home, server, pysf_bytes, monkeypatch, capsys,
                                                          shared_videos):
    entry = _entry(monkeypatch)
    server.files[f"/a/{PYSF_FILE}"] = pysf_bytes
    video = shared_videos / "arm_wrestling_demo.mp4"
    code, out, err = run_cli(["predict", str(video), "--pretrained", entry.name, "--json", "--device", "cpu"], capsys)
    assert code == 0, err
    labels = [r["label"] for r in json.loads(out)[0]["top"]]
    assert set(labels) <= set(kinetics400_classes())  # Kinetics-400 names with no other flag
    assert "Apache-2.0" in err and "https://github.com/facebookresearch/SlowFast" in err  # licence line, first time
    ckpt = load_checkpoint(hub.converted_path(entry))
    cfg = config_from_dict(ckpt["config"])
    assert (cfg.data.num_frames, cfg.data.stride, cfg.data.test_crop_size) == (8, 2, 32)  # the source's views
    assert cfg.model.layout == "8x8" and cfg.model.stem_pool_padding == 1 and cfg.model.width == 8
    assert ckpt["pretrained"]["sha256"] == hashlib.sha256(pysf_bytes).hexdigest()
    record = (home / "downloads" / f"{PYSF_FILE}.sha256").read_text()
    assert record.startswith(hashlib.sha256(pysf_bytes).hexdigest())  # no published hash: recorded beside it
    assert PYSF_FILE in _files(home) and not any(f.endswith(".part") for f in _files(home))
    n = len(server.requests)
    code, out2, err2 = run_cli(["predict", str(video), "--pretrained", entry.name, "--json", "--device", "cpu"],
                               capsys)
    assert code == 0 and json.loads(out2) == json.loads(out)
    assert len(server.requests) == n and "licence" not in err2  # the second run makes no request


def test_published_hash_mismatch_is_refused_and_nothing_kept(home, server, pysf_bytes, monkeypatch):
    entry = _entry(monkeypatch, sha256="0123abcd")
    server.files[f"/a/{PYSF_FILE}"] = pysf_bytes
    with pytest.raises(CheckpointError) as e:
        hub.pretrained_checkpoint(entry.name)
    msg = str(e.value)
    assert hashlib.sha256(pysf_bytes).hexdigest() in msg and "0123abcd" in msg and "\n" not in msg
    assert [f for f in _files(home) if not f.endswith(".lock")] == []


def test_published_hash_match_is_accepted(home, server, pysf_bytes, monkeypatch):
    entry = _entry(monkeypatch, sha256=hashlib.sha256(pysf_bytes).hexdigest()[:8])
    server.files[f"/a/{PYSF_FILE}"] = pysf_bytes
    assert hub.pretrained_checkpoint(entry.name).exists()


def test_unhashed_file_must_pass_strict_import_and_keep_its_hash(home, server, pysf_bytes, monkeypatch, tmp_path):
    entry = _entry(monkeypatch)
    bad = write_caffe2_pkl(small_model("c2d_r50", seed=1), tmp_path / "other.pkl").read_bytes()  # no NL: misfit
    server.files[f"/a/{PYSF_FILE}"] = bad[:-40] + b"."  # truncated pickle
    with pytest.raises(CheckpointError, match="strict import"):
        hub.pretrained_checkpoint(entry.name)
    assert [f for f in _files(home) if not f.endswith(".lock")] == []
    # a file whose hash differs from the one recorded earlier under the same name is refused
    server.files[f"/a/{PYSF_FILE}"] = pysf_bytes
    hub.source_file(entry.name)
    (home / "downloads" / PYSF_FILE).unlink()
    hub.source_file(entry.name)  # downloaded again, same hash: fine
    (home / "downloads" / PYSF_FILE).unlink()
    other = write_caffe2_pkl(small_model("i3d_r50_nl5", seed=6), tmp_path / PYSF_FILE).read_bytes()
    server.files[f"/a/{PYSF_FILE}"] = other
    with pytest.raises(CheckpointError, match="differs from the .* recorded"):
        hub.source_file(entry.name)
    assert PYSF_FILE not in _files(home)


def test_dropped_connection_then_resumed_download(home, server, pysf_bytes, monkeypatch):
    entry = _entry(monkeypatch)
    path = f"/a/{PYSF_FILE}"
    server.files[path] = pysf_bytes
    server.drop.add(path)
    monkeypatch.setattr(hub, "RETRIES", 0)
    with pytest.raises(CheckpointError, match="cannot download"):
        hub.source_file(entry.name)  # one attempt per URL: the primary dropped, the mirror path has no file...
    part = home / "downloads" / f"{PYSF_FILE}.part"
    assert part.exists() and 0 < part.stat().st_size < len(pysf_bytes)
    got = hub.source_file(entry.name)  # ...the next run resumes where it stopped
    assert got.read_bytes() == pysf_bytes and not part.exists()
    assert server.gets(path)[-1][1] == f"bytes={len(pysf_bytes) // 2}-"


def test_dropped_connection_is_retried_with_range(home, server, pysf_bytes, monkeypatch):
    entry = _entry(monkeypatch)
    path = f"/a/{PYSF_FILE}"
    server.files[path] = pysf_bytes
    server.drop.add(path)
    events = []
    got = hub.source_file(entry.name, progress=lambda ev, **d: events.append(ev))
    assert got.read_bytes() == pysf_bytes
    assert [r[1] for r in server.gets(path)] == [None, f"bytes={len(pysf_bytes) // 2}-"]
    assert "retry" in events and events.index("notice") < events.index("download")


def test_404_on_primary_falls_back_to_mirror(home, server, pysf_bytes, monkeypatch):
    entry = _entry(monkeypatch)
    server.files[f"/b/{PYSF_FILE}"] = pysf_bytes
    assert hub.source_file(entry.name).read_bytes() == pysf_bytes
    assert [r[2] for r in server.requests] == [404, 200]


def test_404_everywhere_names_every_url(home, server, monkeypatch):
    entry = _entry(monkeypatch)
    with pytest.raises(CheckpointError) as e:
        hub.source_file(entry.name)
    msg = str(e.value)
    assert "not found on any mirror" in msg and f"/a/{PYSF_FILE}" in msg and f"/b/{PYSF_FILE}" in msg


def test_no_network_names_url_and_cache_path(home, monkeypatch, capsys):
    entry = _entry(monkeypatch)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("NLVID_ZOO_MIRROR", f"http://127.0.0.1:{port}")
    code, _, err = run_cli(["predict", "x.mp4", "--pretrained", entry.name], capsys)
    assert code == 1
    line = [ln for ln in err.splitlines() if ln.startswith("error:")][0]
    assert f"http://127.0.0.1:{port}/a/{PYSF_FILE}" in line and str(home / "downloads" / PYSF_FILE) in line


def test_offline_without_and_with_cache(home, server, pysf_bytes, monkeypatch):
    entry = _entry(monkeypatch)
    server.files[f"/a/{PYSF_FILE}"] = pysf_bytes
    monkeypatch.setenv("NLVID_OFFLINE", "1")
    with pytest.raises(CheckpointError, match=re.escape(str(home / "downloads" / PYSF_FILE))):
        hub.pretrained_checkpoint(entry.name)
    assert server.requests == []
    # a file put in the cache by hand is verified and converted without the network
    (home / "downloads").mkdir(parents=True, exist_ok=True)
    (home / "downloads" / PYSF_FILE).write_bytes(pysf_bytes)
    assert hub.pretrained_checkpoint(entry.name).exists() and server.requests == []
    assert hub.cache_state(entry) == "converted"


def test_two_concurrent_downloads_fetch_once(home, server, pysf_bytes, monkeypatch):
    entry = _entry(monkeypatch)
    server.files[f"/a/{PYSF_FILE}"] = pysf_bytes
    server.slow = 0.01
    results, errors = [], []

    def work():
        try:
            results.append(hub.pretrained_checkpoint(entry.name))
        except Exception as e:  # pragma: no cover (reported below)
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(results) == 2 and results[0] == results[1]
    assert len(server.gets(f"/a/{PYSF_FILE}")) == 1
    assert (home / "downloads" / PYSF_FILE).read_bytes() == pysf_bytes
    load_checkpoint(results[0])


def test_disk_full_leaves_nothing(home, server, pysf_bytes, monkeypatch):
    entry = _entry(monkeypatch)
    server.files[f"/a/{PYSF_FILE}"] = pysf_bytes

    def full(f, chunk):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hub, "_write", full)
    with pytest.raises(CheckpointError, match="disk full"):
        hub.source_file(entry.name)
    assert [f for f in _files(home) if not f.endswith(".lock")] == []


def test_imagenet_entry_is_for_initialisation(home, server, monkeypatch, capsys, tmp_path):
    from torchvision.models import resnet18

    torch.manual_seed(0)
    data_path = tmp_path / "resnet18.pth"
    torch.save(resnet18().state_dict(), data_path)
    raw = data_path.read_bytes()
    base = zoo.get_entry("torchvision_resnet18")
    name = f"resnet18-{hashlib.sha256(raw).hexdigest()[:8]}.pth"
    entry = dataclasses.replace(base, name="test_tv18", urls=(f"https://download.invalid/models/{name}",),
                                sha256=hashlib.sha256(raw).hexdigest()[:8])
    monkeypatch.setitem(zoo.REGISTRY, entry.name, entry)
    server.files[f"/models/{name}"] = raw
    with pytest.raises(ConfigError, match="ImageNet backbone"):
        hub.pretrained_checkpoint(entry.name)
    out = tmp_path / "c2d.pt"
    code, _, err = run_cli(["build", "c2d_r18", "--pretrained", entry.name, "--classes", "7", "--size", "64",
                            "--out", str(out)], capsys)
    assert code == 0, err
    ckpt = load_checkpoint(out)
    cfg = config_from_dict(ckpt["config"])
    assert cfg.data.mean == [0.485, 0.456, 0.406] and cfg.model.num_classes == 7
    assert torch.equal(ckpt["model"]["stem.conv.weight"][:, :, 0], torch.load(data_path)["conv1.weight"])


def test_build_init_stores_the_source_preprocessing(tmp_path, capsys):
    ref = small_model("i3d_r50_nl5", seed=2, layout="mmaction2", stem_pool_padding=1, pool_position="after",
                      scale=False)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if n.endswith("out.bias"):
                p.zero_()
    name = "i3d_imagenet-pretrained-r50-nl-embedded-gaussian_8xb8-32x2x1-100e_kinetics400-rgb_20220812-afd8f562.pth"
    path = write_mmaction2_pth(ref, tmp_path / name)
    out = tmp_path / "mm.pt"
    code, _, err = run_cli(["build", "i3d_r50_nl5", "--init", f"mmaction2={path}", "--size", "32", "--out",
                            str(out)], capsys)
    assert code == 0, err
    cfg = config_from_dict(load_checkpoint(out)["config"])
    assert (cfg.data.num_frames, cfg.data.stride) == (32, 2)
    assert cfg.data.mean == [0.485, 0.456, 0.406] and cfg.data.std == [0.229, 0.224, 0.225]
    code, _, _ = run_cli(["build", "i3d_r50_nl5", "--init", f"mmaction2={path}", "--size", "32", "--frames", "8",
                          "--out", str(out)], capsys)
    assert code == 0 and config_from_dict(load_checkpoint(out)["config"]).data.num_frames == 8  # flags win


# ----------------------------------------------------------------------------------------------------------------
# Every registry entry, end to end (slow)
# ----------------------------------------------------------------------------------------------------------------


def _fixture_for(entry: zoo.ZooEntry, tmp: Path) -> bytes:
    """A format-exact file of the entry's architecture (width 8), under its published name."""
    opts = {k: v for k, v in entry.model.items()}
    ref = small_model(entry.preset, seed=11, **opts)
    path = tmp / entry.file_name
    if entry.format == "mmaction2":
        with torch.no_grad():
            for n, p in ref.named_parameters():
                if n.endswith("out.bias"):
                    p.zero_()
        return write_mmaction2_pth(ref, path).read_bytes()
    return write_caffe2_pkl(ref, path, frozen_bn="frozenbn" in entry.name).read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("name", [e.name for e in zoo.list_entries() if e.is_classifier])
def test_every_entry_predicts_through_a_mirror(name, home, server, monkeypatch, capsys, tmp_path, shared_videos):
    entry = zoo.get_entry(name)
    raw = _fixture_for(entry, tmp_path)
    if entry.sha256:  # the fixture cannot have the published hash: the test registry carries the fixture's
        entry = dataclasses.replace(entry, sha256=hashlib.sha256(raw).hexdigest()[:8])
        monkeypatch.setitem(zoo.REGISTRY, name, entry)
    from urllib.parse import urlsplit

    server.files[urlsplit(entry.urls[0]).path] = raw
    video = shared_videos / "arm_wrestling_demo.mp4"
    code, out, err = run_cli(["predict", str(video), "--pretrained", name, "--clips", "1", "--crops", "1", "--json",
                              "--device", "cpu"], capsys)
    assert code == 0, err
    assert set(r["label"] for r in json.loads(out)[0]["top"]) <= set(kinetics400_classes())
    ckpt = load_checkpoint(hub.converted_path(entry))
    cfg = config_from_dict(ckpt["config"])
    for k, v in entry.model.items():  # the importer computes what the registry says the source computes
        assert getattr(cfg.model, k) == v, k
    for k, v in entry.data.items():
        assert getattr(cfg.data, k) == v, k


def test_eval_and_visualize_take_pretrained(home, server, pysf_bytes, monkeypatch, capsys, shared_videos, tmp_path):
    entry = _entry(monkeypatch)
    server.files[f"/a/{PYSF_FILE}"] = pysf_bytes
    video = shared_videos / "arm_wrestling_demo.mp4"
    code, out, err = run_cli(["visualize", str(video), "--pretrained", entry.name, "--json", "--device", "cpu"],
                             capsys)
    assert code == 0, err
    assert json.loads(out)["blocks"][0]["block"].startswith("res3.nl.")
    data = tmp_path / "k400" / "arm wrestling"
    data.mkdir(parents=True)
    (data / "a.mp4").symlink_to(video)
    n = len(server.requests)
    code, out, err = run_cli(["eval", "--pretrained", entry.name, str(tmp_path / "k400"), "--json", "--device", "cpu",
                              "--workers", "0", "--out", str(tmp_path / "ev")], capsys)
    assert code == 0, err
    assert json.loads(out)["num_videos"] == 1 and len(server.requests) == n
    code, _, err = run_cli(["eval", "--pretrained", entry.name, "a", "b"], capsys)
    assert code == 2 and "only DATA" in err


def test_train_fine_tunes_pretrained_with_a_new_classifier(home, server, pysf_bytes, monkeypatch, capsys, tmp_path,
                                                           synthetic_data):
    from engine_settings import FAST

    entry = _entry(monkeypatch)
    server.files[f"/a/{PYSF_FILE}"] = pysf_bytes
    args = ["train", str(synthetic_data), "--pretrained", entry.name, "--out", str(tmp_path / "run")]
    for s in FAST + ["train.epochs=1", "train.batch_size=4"]:
        args += ["--set", s]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    assert "classifier re-initialised" in err
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    cfg = config_from_dict(ckpt["config"])
    assert cfg.model.num_classes == 4 and cfg.model.name == "i3d_r50_nl5" and cfg.model.width == 8
    assert (cfg.data.num_frames, cfg.data.stride) == (8, 2)  # the weights' clip
    assert f"{hub.converted_path(entry)}: nlvid checkpoint of model 'i3d_r50_nl5'" in err  # initialised from it
