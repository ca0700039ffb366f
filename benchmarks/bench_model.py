"""Whole-model training step and inference: nlvid presets vs PySlowFast's own model builder, side by side in one run.

    .venv/bin/python benchmarks/bench_model.py             # i3d_r50_nl5 and c2d_r50_nl5, 8 and 32 frames (~12 min idle)
    .venv/bin/python benchmarks/bench_model.py --quick     # i3d_r50_nl5 only, fewer repetitions (~5 min idle)
    .venv/bin/python benchmarks/bench_model.py --slowfast DIR   # or env NLVID_SLOWFAST=DIR
    .venv/bin/python benchmarks/bench_model.py --reference pytorchvideo   # pytorchvideo-built reference instead

The reference: PySlowFast's `ResNet` built from configs/Kinetics/c2/I3D_NLN_8x8_R50.yaml (400 classes; MODEL.ARCH
"c2d" for the C2D row, DATA.NUM_FRAMES / TRAIN_CROP_SIZE set to the workload so its head pools the whole map). DIR
is a PySlowFast checkout (a folder holding `slowfast/`) or a bare git repository of it (default: the snapshot at
/work/.mirror/facebookresearch+SlowFast/repo), whose `slowfast/` and `configs/` are exported once to
$TMPDIR/nlvid-slowfast-<commit>. It needs fvcore, iopath, simplejson and pytorchvideo (pip; none pulls a torch).
Stubbed, because the model builder imports but never uses them: detectron2's ROIAlign (AVA detection head only),
the distributed helpers that the pytorchvideo 0.1.5 release lacks (cat_all_gather, get_local_*, ...;
slowfast.utils.distributed imports them), and `slowfast/models/__init__.py` is skipped (it imports MViT /
contrastive / PyTorchVideo-wrapper models that need pytorchvideo master); `video_model_builder.ResNet` is used
directly. `--reference pytorchvideo` (and `auto`, the default, when no PySlowFast source is found) builds the
reference from pytorchvideo's create_resnet + create_nonlocal instead (benchmarks/ptv_reference.py: the same
parameters and multiply-adds, checked like PySlowFast's).

What is compared, per model and workload (batch 2 x 8 frames and batch 1 x 32 frames, 224 x 224):
- parameters and multiply-adds (torch FlopCounterMode, FLOPs / 2, one clip of the workload); the count registers
  torch's attention formula for `_scaled_dot_product_flash_attention_for_cpu` (the CPU SDPA kernel that nlvid's NL
  fast path runs), which FlopCounterMode does not count on its own. The run stops if either differs.
- training step: forward, cross-entropy, backward, SGD (lr 0.01, momentum 0.9, weight decay 1e-4) in train mode,
  on a FRESH random clip batch and labels each step (made outside the timed region). A step repeated on one fixed
  clip drives the loss to ~0 (issue #17 saw gradients go denormal and a 32-frame step slow down 44x), which would
  measure the CPU's denormal penalty rather than the model.
- inference: forward of a fresh random batch under torch.no_grad(), eval mode.
- time: both models in ONE fresh subprocess per (model, workload, kind, allocator), steps alternated (nlvid, ref,
  nlvid, ...) after warm-up steps, median of the timed steps; load average printed with every row.
- peak memory growth of a training step: a fresh subprocess per implementation, model and workload, glibc told to
  serve every allocation >= 64 KiB with mmap (MALLOC_MMAP_THRESHOLD_=65536, MALLOC_TRIM_THRESHOLD_=0) so freed
  tensors leave the resident set at once; after one warm-up step (which also creates the momentum buffers) the
  kernel's peak-RSS counter is reset (/proc/self/clear_refs = 5) and the growth is VmHWM after one more step minus
  VmRSS just before it, with the warm-up's gradients released (parameters, momentum and libraries excluded; the
  input batch, gradients, saved activations and every transient buffer of forward and backward included; before
  2026-12-02 the warm-up's gradients were still held at the baseline and the step freed them, so the growth left
  out the gradients, ~135 MiB for these models).
- allocator (`--malloc`, default both): "default" is glibc as configured out of the box, which serves blocks over
  its (adaptive, at most 32 MiB) mmap threshold with fresh mmaps, so every large activation of every step is
  page-faulted in again (the kernel zeroes each 4 KiB page); "heap" sets MALLOC_MMAP_THRESHOLD_ and
  MALLOC_TRIM_THRESHOLD_ to 2 GiB for the subprocess, so freed blocks are reused without page faults (what
  jemalloc / tcmalloc, recommended for CPU training by PyTorch's performance guide, also give). The two models
  page-fault by different amounts, so the ratio depends on it: both rows are printed.
- kept for backward (memory subprocesses, after the measurement): the bytes autograd holds for backward at the end
  of forward (unique storages packed by saved_tensors_hooks; parameters and the input clip excluded), and its
  floor: the inputs of every convolution and every train-mode BatchNorm (unique storages). A backward that
  recomputes nothing needs each conv's input (weight gradient) and each BN's input (or its normalised copy, the
  same size) at the end of forward, so floor(nlvid) / peak(reference) is a lower bound for the peak-memory ratio
  of any exact training step of this network without recomputation (activation checkpointing).
fp32, torch.set_num_threads(--threads, default 2). Ratios are nlvid / reference: below 1 is better for nlvid.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

DEFAULT_SLOWFAST = "/work/.mirror/facebookresearch+SlowFast/repo"
MODELS = ("i3d_r50_nl5", "c2d_r50_nl5")
# name -> (batch, frames, size)
WORKLOADS = {"8f": (2, 8, 224), "32f": (1, 32, 224)}
# (kind, workload) -> target ratio (nlvid / PySlowFast), from issue #17
TARGETS = {("train", "8f"): 0.8, ("train", "32f"): 0.8, ("memory", "8f"): 0.6, ("memory", "32f"): 0.5,
           ("infer", "8f"): 0.65, ("infer", "32f"): 0.65}
CHECKPOINT_MEMORY_TARGET = 0.3  # issue #17: peak memory with stage checkpointing, any clip length
REFERENCES = {"pyslowfast": "PySlowFast", "pytorchvideo": "pytorchvideo"}
# glibc settings per --malloc choice, for the time subprocesses (see the docstring)
MALLOC_ENV = {"default": {}, "heap": {"MALLOC_MMAP_THRESHOLD_": str(2**31), "MALLOC_TRIM_THRESHOLD_": str(2**31)}}


# ---------------------------------------------------------------------------------------------- the reference


def _slowfast_source(path: str) -> Path:
    """A folder holding PySlowFast's `slowfast/` and `configs/`: `path` itself, or an export of the bare git
    repository `path` (cached per commit under the temp dir)."""
    p = Path(path)
    if (p / "slowfast" / "models" / "video_model_builder.py").is_file():
        return p
    if not (p / "HEAD").is_file() or not (p / "objects").is_dir():
        raise SystemExit(f"--slowfast {path}: neither a PySlowFast checkout (slowfast/models/...) nor a bare git "
                         "repository of it; give one with --slowfast DIR or NLVID_SLOWFAST=DIR")
    commit = subprocess.run(["git", "--git-dir", str(p), "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    out = Path(tempfile.gettempdir()) / f"nlvid-slowfast-{commit[:12]}"
    if not (out / "slowfast" / "models" / "video_model_builder.py").is_file():
        tmp = Path(tempfile.mkdtemp(prefix="nlvid-slowfast-", dir=tempfile.gettempdir()))
        # only the package and the configs: some other blobs (demo GIFs) may be absent from a partial snapshot
        archive = subprocess.run(["git", "--git-dir", str(p), "archive", "HEAD", "slowfast", "configs"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
        if not out.exists():
            tmp.rename(out)
    return out


def _import_slowfast(src: Path):
    """PySlowFast's ResNet class and get_cfg, with the stubs described in the module docstring."""
    sys.path.insert(0, str(src))
    import pytorchvideo.layers.distributed as ptv_dist

    for name in ("cat_all_gather", "get_local_process_group", "get_local_rank", "get_local_size", "get_world_size",
                 "init_distributed_training"):
        if not hasattr(ptv_dist, name):
            def _unused(*a, _name=name, **k):
                raise RuntimeError(f"stub: pytorchvideo.layers.distributed.{_name} is not available")
            setattr(ptv_dist, name, _unused)
    if "detectron2" not in sys.modules:
        d2, d2_layers = types.ModuleType("detectron2"), types.ModuleType("detectron2.layers")

        class ROIAlign:  # used only by the AVA detection head
            def __init__(self, *a, **k):
                raise RuntimeError("stub: detectron2 is not installed")

        d2_layers.ROIAlign = ROIAlign
        d2.layers = d2_layers
        sys.modules["detectron2"], sys.modules["detectron2.layers"] = d2, d2_layers
    import slowfast  # noqa: F401

    models_pkg = types.ModuleType("slowfast.models")  # skip slowfast/models/__init__.py (see the docstring)
    models_pkg.__path__ = [str(src / "slowfast" / "models")]
    sys.modules["slowfast.models"] = models_pkg
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from slowfast.config.defaults import get_cfg
        from slowfast.models.video_model_builder import ResNet
    return ResNet, get_cfg


def build(impl: str, model: str, frames: int, size: int, slowfast: str | None = None, checkpoint: str = "off"):
    import torch

    torch.manual_seed(0)
    arch = model.split("_")[0]
    if impl == "nlvid":
        from nlvid.models import create_model

        m = create_model(model, layout="8x8", num_classes=400, stem_pool_padding=1)
        if checkpoint != "off":
            m.set_checkpointing(checkpoint)
        return m
    if impl == "pytorchvideo":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from ptv_reference import build_ptv

        return build_ptv(model, frames, size)
    src = _slowfast_source(slowfast)
    ResNet, get_cfg = _import_slowfast(src)
    cfg = get_cfg()
    cfg.merge_from_file(str(src / "configs" / "Kinetics" / "c2" / "I3D_NLN_8x8_R50.yaml"))
    cfg.NUM_GPUS = 0
    cfg.MODEL.ARCH = arch
    cfg.DATA.NUM_FRAMES, cfg.DATA.TRAIN_CROP_SIZE = frames, size
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _ListInput(ResNet(cfg))


class _ListInput:
    """PySlowFast's ResNet takes a list of pathways; this wrapper makes it callable like nlvid's model."""

    def __init__(self, m):
        self.m = m

    def __call__(self, x):
        return self.m([x])

    def __getattr__(self, name):
        return getattr(self.m, name)


# ---------------------------------------------------------------------------------------------- measuring


def macs(model, x) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)  # torch's formula for the other SDPA ops

    # FlopCounterMode has no formula for the CPU flash-attention op (nlvid's NL fast path): register torch's own
    # SDPA formula for it (forward only: the count runs under no_grad).
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: sdpa_cpu_flop}
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as fc:
        model(x)
    return fc.get_total_flops() // 2


def kept_for_backward(model, x) -> tuple[int, int]:
    """(bytes autograd keeps for backward at the end of a train-mode forward, the floor of it: the inputs of every
    convolution and train-mode BatchNorm), unique storages still alive at the end of forward, parameters and x
    excluded (see the docstring)."""
    import gc
    import weakref

    import torch
    import torch.nn.functional as F
    from torch.utils._python_dispatch import TorchDispatchMode

    def key(t):
        return t.untyped_storage().data_ptr()

    skip = {key(p) for p in model.parameters()} | {key(x)}
    conv_bn_inputs: list = []
    saved: list = []
    floor_ops = {"convolution", "native_batch_norm", "_native_batch_norm_legit"}

    class ConvAndBNInputs(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] in floor_ops:
                conv_bn_inputs.append(weakref.ref(args[0]))
            return func(*args, **(kwargs or {}))

    def pack(t):
        saved.append(weakref.ref(t))
        return t

    def alive_bytes(refs) -> int:
        storages = {}
        for r in refs:
            t = r()
            if t is not None and key(t) not in skip:
                storages[key(t)] = t.untyped_storage().nbytes()
        return sum(storages.values())

    model.train()
    with ConvAndBNInputs(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), torch.zeros(x.shape[0], dtype=torch.long))
    gc.collect()
    out = alive_bytes(saved), alive_bytes(conv_bn_inputs)
    del loss
    return out


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _stepper(model, kind: str, batch: int, frames: int, size: int, seed: int):
    """A function running one step on a fresh random batch, returning its seconds (batch made outside the timing)."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    if kind == "train":
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

        def step() -> float:
            x = torch.randn(batch, 3, frames, size, size, generator=gen)
            y = torch.randint(0, 400, (batch,), generator=gen)
            opt.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            return time.perf_counter() - t0
    else:
        model.eval()

        def step() -> float:
            x = torch.randn(batch, 3, frames, size, size, generator=gen)
            t0 = time.perf_counter()
            with torch.no_grad():
                model(x)
            return time.perf_counter() - t0

    return step


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    batch, frames, size = WORKLOADS[args.workload]
    if args.measure == "time":
        steps = {impl: _stepper(build(impl, args.model, frames, size, args.slowfast, args.checkpoint), args.kind,
                                batch, frames, size, seed=1)
                 for impl in ("nlvid", args.reference)}
        times: dict[str, list[float]] = {impl: [] for impl in steps}
        for i in range(args.warmup + args.reps):
            for impl, step in steps.items():  # alternated, so a load that changes hits both alike
                sec = step()
                if i >= args.warmup:
                    times[impl].append(sec)
        print(json.dumps({impl: {"time_s": statistics.median(t), "times": t} for impl, t in times.items()}))
        return
    model = build(args.impl, args.model, frames, size, args.slowfast, args.checkpoint)
    step = _stepper(model, args.kind, batch, frames, size, seed=1)
    step()  # warm-up: allocator, momentum buffers, one-off caches
    for p in model.parameters():
        p.grad = None  # the step's gradients count in its growth (the step frees old ones before making new ones)
    torch.randn(1)  # nothing pending
    base = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current RSS
    step()
    peak_mb = (_status_kb("VmHWM") - base) / 1024.0
    saved, floor = (0, 0) if args.checkpoint != "off" else kept_for_backward(model, torch.randn(batch, 3, frames, size,
                                                                                               size))
    print(json.dumps({"peak_mb": peak_mb, "saved_mb": saved / 2**20, "floor_mb": floor / 2**20}))


def run_worker(args, measure: str, model: str, workload: str, kind: str, impl: str = "both", reps: int = 0,
               warmup: int = 0, malloc: str = "default") -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        env.pop(name, None)
    if measure == "memory":
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    else:
        env.update(MALLOC_ENV[malloc])
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--measure", measure, "--model", model,
           "--workload", workload, "--kind", kind, "--impl", impl, "--reps", str(reps), "--warmup", str(warmup),
           "--threads", str(args.threads), "--slowfast", args.slowfast, "--checkpoint", args.checkpoint,
           "--reference", args.reference]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"worker failed: {' '.join(cmd)}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def check_equal_size(args, models) -> list[str]:
    """Parameters and MACs of both implementations, per model and workload; SystemExit if they differ."""
    import torch

    lines, bad = [], []
    for model in models:
        for wl in args.workloads:
            _, frames, size = WORKLOADS[wl]
            x = torch.randn(1, 3, frames, size, size)
            counts = {}
            for impl in ("nlvid", args.reference):
                m = build(impl, model, frames, size, args.slowfast)
                params = sum(p.numel() for p in m.parameters())
                counts[impl] = (params, macs(m, x))
            (pn, mn), (pr, mr) = counts["nlvid"], counts[args.reference]
            same = pn == pr and abs(mn - mr) <= 1e-3 * mr
            lines.append(f"{model} {frames}x{size}: params {pn:,} vs {pr:,}, GMACs/clip {mn / 1e9:.2f} vs "
                         f"{mr / 1e9:.2f} -> {'same' if same else 'DIFFERENT'}")
            if not same:
                bad.append(lines[-1])
    if bad:
        raise SystemExit("models differ in size, the comparison would be meaningless:\n" + "\n".join(bad))
    return lines


def _resolve_reference(args) -> None:
    """args.reference -> "pyslowfast" or "pytorchvideo"; args.slowfast -> an exported PySlowFast source (or "")."""
    if args.reference in ("auto", "pyslowfast"):
        try:
            args.slowfast = str(_slowfast_source(args.slowfast))  # export once, before the workers start
            args.reference = "pyslowfast"
            return
        except (SystemExit, subprocess.CalledProcessError, OSError) as e:
            if args.reference == "pyslowfast":
                raise
            print(f"# no PySlowFast source ({str(e).splitlines()[0]}): the reference is pytorchvideo",
                  file=sys.stderr)
    args.reference, args.slowfast = "pytorchvideo", ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="i3d_r50_nl5 only, fewer repetitions (noisier)")
    p.add_argument("--reference", default="auto", choices=("auto", *REFERENCES),
                   help="what nlvid is compared with (auto: PySlowFast when its source is found, else pytorchvideo)")
    p.add_argument("--slowfast", default=os.environ.get("NLVID_SLOWFAST", DEFAULT_SLOWFAST),
                   help="PySlowFast checkout or bare git repository (env NLVID_SLOWFAST)")
    p.add_argument("--models", nargs="+", default=None, choices=MODELS)
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=None, help="timed training steps per model (inference: +2)")
    p.add_argument("--malloc", default="both", choices=("both", *MALLOC_ENV),
                   help="glibc allocator setting of the time subprocesses (see the docstring)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--no-time", action="store_true", help="skip the timing subprocesses")
    p.add_argument("--checkpoint", default="off", choices=("off", "nonlocal", "stages"),
                   help="nlvid activation checkpointing (ResNet3d.set_checkpointing) in the training step")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--measure", default="time", help=argparse.SUPPRESS)
    p.add_argument("--impl", default="both", help=argparse.SUPPRESS)
    p.add_argument("--model", default=MODELS[0], help=argparse.SUPPRESS)
    p.add_argument("--workload", default="8f", help=argparse.SUPPRESS)
    p.add_argument("--kind", default="train", help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.reps = args.reps or 1
        worker(args)
        return
    _resolve_reference(args)
    ref_name = REFERENCES[args.reference]

    import torch

    models = args.models or (["i3d_r50_nl5"] if args.quick else list(MODELS))
    train_reps = args.reps or (2 if args.quick else 3)
    infer_reps = train_reps + 2
    mallocs = list(MALLOC_ENV) if args.malloc == "both" else [args.malloc]
    t_start = time.time()
    source = args.slowfast if args.reference == "pyslowfast" else "benchmarks/ptv_reference.py"
    print(f"# Whole-model benchmark: nlvid vs {ref_name} ({source}), CPU fp32, {args.threads} threads, "
          f"torch {torch.__version__}; training steps: fresh random batch each step, SGD lr 0.01 momentum 0.9; "
          f"medians of {train_reps} training / {infer_reps} inference steps after 1 warm-up, alternated; "
          f"nlvid checkpoint={args.checkpoint}; load average {os.getloadavg()[0]:.2f} at start\n", flush=True)
    for line in check_equal_size(args, models):
        print("check:", line, flush=True)
    print(flush=True)

    rows, kept = [], []
    for model in models:
        for wl in args.workloads:
            batch, frames, size = WORKLOADS[wl]
            shape = f"{batch}x3x{frames}x{size}x{size}"
            for kind, reps in () if args.no_time else (("train", train_reps), ("infer", infer_reps)):
                for malloc in mallocs:
                    print(f"running {model} {kind} {shape} malloc={malloc} ...", file=sys.stderr, flush=True)
                    load = os.getloadavg()[0]
                    res = run_worker(args, "time", model, wl, kind, reps=reps, warmup=1, malloc=malloc)
                    ours, ref = res["nlvid"]["time_s"], res[args.reference]["time_s"]
                    target = TARGETS[(kind, wl)]
                    label = "training step" if kind == "train" else "inference"
                    rows.append((model, shape, f"{label} time (malloc {malloc})", f"{ours:.2f} s", f"{ref:.2f} s",
                                 ours / ref, target, f"{load:.1f}"))
            if not args.no_memory:
                load = os.getloadavg()[0]
                mem = {impl: run_worker(args, "memory", model, wl, "train", impl=impl)
                       for impl in ("nlvid", args.reference)}
                ours, ref = mem["nlvid"], mem[args.reference]
                target = CHECKPOINT_MEMORY_TARGET if args.checkpoint == "stages" else TARGETS[("memory", wl)]
                rows.append((model, shape, "training peak memory growth", f"{ours['peak_mb']:.0f} MiB",
                             f"{ref['peak_mb']:.0f} MiB", ours["peak_mb"] / ref["peak_mb"], target, f"{load:.1f}"))
                if args.checkpoint == "off":
                    kept.append(f"| {model} | {shape} | {ours['saved_mb']:.0f} / {ours['floor_mb']:.0f} MiB | "
                                f"{ref['saved_mb']:.0f} / {ref['floor_mb']:.0f} MiB | "
                                f"{ours['floor_mb'] / ref['peak_mb']:.2f}x |")

    print(f"| model | input (B x C x T x H x W) | metric | nlvid | {ref_name} | ratio | target | load |")
    print("|---|---|---|---|---|---|---|---|")
    for model, shape, metric, ours, ref, ratio, target, load in rows:
        verdict = "met" if ratio <= target else "missed"
        print(f"| {model} | {shape} | {metric} | {ours} | {ref} | {ratio:.2f}x | <= {target}x ({verdict}) | {load} |")
    if kept:
        print(f"\nKept for backward at the end of forward / of it the inputs of convs and train-mode BNs (the floor "
              f"of any training step that recomputes nothing); last column: nlvid's floor / {ref_name}'s measured "
              "peak growth, a lower bound for the peak-memory ratio without activation checkpointing:\n")
        print(f"| model | input | nlvid kept / floor | {ref_name} kept / floor | lower bound of the memory ratio |")
        print("|---|---|---|---|---|")
        print("\n".join(kept))
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}; wall time {time.time() - t_start:.0f} s "
          "(the machine may be shared: compare the ratios, rerun on an idle machine for final numbers)")


if __name__ == "__main__":
    main()
