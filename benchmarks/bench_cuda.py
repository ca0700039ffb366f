"""The CUDA checks of issue #17 as one prepared run for a GPU machine (the 2-core CI machines have no GPU).

    python benchmarks/bench_cuda.py --out cuda.json         # on a CUDA machine (a few minutes on one H200)
    python benchmarks/bench_cuda.py --device cpu --small    # the same code on CPU at toy sizes (seconds): a smoke run

What it measures, each cell on its own (a failure is recorded as that cell's one-line error, the rest still runs):
1. NL block (embedded gaussian, nlvid's default NonLocalBlock) at the res3 shape of I3D-R50 8x8, (B, 512, T, 28, 28)
   with T = 4 and 16: forward + backward time per precision (fp32, bf16 autocast, fp16 autocast) and per
   scaled-dot-product-attention backend (torch's choice, or one forced with torch.nn.attention.sdpa_kernel: flash,
   memory-efficient, math), whether that backend takes the block's tensors, and the output's largest difference from
   the fp32 run relative to its largest value.
2. Whole model (`i3d_r50_nl5`, `c2d_r50_nl5`, 8x8 layout, 400 classes): training step (forward, cross-entropy,
   backward, SGD momentum 0.9) at batch 8 x 8 x 224 and 2 x 32 x 224, fp32 / bf16 autocast / fp16 autocast with
   a GradScaler; the input channels-last (the trunk's own layout) or contiguous; step time (median after warm-up),
   peak memory growth of a step (torch.cuda.max_memory_allocated), and inference clips/s.
3. DDP with NCCL, 2 processes, one GPU each, each on its own 8 x 8 x 224 batches: the step time (median of 5 after
   2 warm-up steps), and whether both processes end with the same weights (DDP's all-reduce). NCCL refuses two
   ranks on one device, so this row needs two GPUs; with fewer it says so.

Results go to stdout as markdown tables (and to --out as JSON); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

PRECISIONS = ("fp32", "bf16", "fp16")
BACKENDS = ("auto", "flash", "efficient", "math")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _autocast(device: str, precision: str):
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _sdpa_context(backend: str):
    if backend == "auto":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                        "math": SDPBackend.MATH}[backend])


def _timed(fn, device: str, warmup: int, reps: int) -> float:
    """Median seconds of fn() over reps runs after warmup runs."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:160]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------ NL block


def nonlocal_rows(device: str, small: bool, warmup: int, reps: int) -> list[dict]:
    from nlvid.models.nonlocal_block import NonLocalBlock

    shapes = [(2, 64, 2, 8, 8)] if small else [(8, 512, 4, 28, 28), (2, 512, 16, 28, 28)]
    rows = []
    for shape in shapes:
        torch.manual_seed(0)
        block = NonLocalBlock(shape[1]).to(device).train()
        with torch.no_grad():
            block.bn.weight.fill_(1.0)  # identity at init otherwise: gradients and outputs would carry no signal
        x = torch.randn(shape, device=device).contiguous(memory_format=torch.channels_last_3d)
        reference = None
        for precision in PRECISIONS:
            for backend in BACKENDS:
                row = {"shape": list(shape), "precision": precision, "backend": backend}
                _log(f"NL block {shape} {precision} {backend} ...")
                try:
                    xin = x.detach().requires_grad_()

                    def step():
                        with _sdpa_context(backend), _autocast(device, precision):
                            y = block(xin)
                        y.float().square().mean().backward()
                        return y

                    with torch.no_grad(), _sdpa_context(backend), _autocast(device, precision):
                        out = block(x).float()
                    if reference is None and precision == "fp32" and backend == "auto":
                        reference = out
                    row["ms"] = 1e3 * _timed(step, device, warmup, reps)
                    if reference is not None:
                        row["rel_diff_vs_fp32"] = ((out - reference).abs().max() / reference.abs().max()).item()
                except Exception as exc:  # a backend that refuses these tensors is a result, not a crash
                    row["error"] = _first_line(exc)
                rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------- whole model


def _build(name: str, small: bool, device: str):
    from nlvid.models import create_model

    torch.manual_seed(0)
    kw = {"width": 8} if small else {}
    return create_model(name, layout="8x8", num_classes=400, stem_pool_padding=1, **kw).to(device)


def model_rows(device: str, small: bool, warmup: int, reps: int) -> list[dict]:
    workloads = [(2, 8, 32)] if small else [(8, 8, 224), (2, 32, 224)]
    models = ["i3d_r50_nl5"] if small else ["i3d_r50_nl5", "c2d_r50_nl5"]
    rows = []
    for name in models:
        model = _build(name, small, device)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        for batch, frames, size in workloads:
            gen = torch.Generator(device=device).manual_seed(0)
            for precision in PRECISIONS:
                for layout in ("channels_last", "contiguous"):
                    row = {"model": name, "input": [batch, 3, frames, size, size], "precision": precision,
                           "layout": layout}
                    _log(f"{name} {row['input']} {precision} {layout} ...")
                    fmt = torch.channels_last_3d if layout == "channels_last" else torch.contiguous_format
                    scaler = torch.amp.GradScaler(device) if precision == "fp16" else None

                    def batch_xy():
                        x = torch.randn(batch, 3, frames, size, size, device=device, generator=gen)
                        y = torch.randint(0, 400, (batch,), device=device, generator=gen)
                        return x.contiguous(memory_format=fmt), y

                    def train_step():
                        x, y = batch_xy()  # fresh clips: a repeated clip drives the loss to 0 (see bench_model)
                        opt.zero_grad(set_to_none=True)
                        with _autocast(device, precision):
                            loss = F.cross_entropy(model(x), y)
                        if scaler is not None:
                            scaler.scale(loss).backward()
                            scaler.step(opt)
                            scaler.update()
                        else:
                            loss.backward()
                            opt.step()

                    def infer_step():
                        x, _ = batch_xy()
                        with torch.no_grad(), _autocast(device, precision):
                            model(x)

                    try:
                        model.train()
                        row["train_ms"] = 1e3 * _timed(train_step, device, warmup, reps)
                        if device == "cuda":
                            opt.zero_grad(set_to_none=True)
                            _sync(device)
                            before = torch.cuda.memory_allocated()
                            torch.cuda.reset_peak_memory_stats()
                            train_step()
                            _sync(device)
                            row["train_peak_growth_mib"] = (torch.cuda.max_memory_allocated() - before) / 2**20
                        model.eval()
                        row["infer_clips_per_s"] = batch / _timed(infer_step, device, warmup, reps)
                    except Exception as exc:
                        row["error"] = _first_line(exc)
                    rows.append(row)
        del model, opt
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------------------------- DDP


def _ddp_worker(rank: int, world: int, port: int, small: bool, queue) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    model = DDP(_build("i3d_r50_nl5", small, "cuda"), device_ids=[rank])
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batch, frames, size = (2, 8, 32) if small else (8, 8, 224)
    gen = torch.Generator(device="cuda").manual_seed(rank)

    def step():
        x = torch.randn(batch, 3, frames, size, size, device="cuda", generator=gen)
        y = torch.randint(0, 400, (batch,), device="cuda", generator=gen)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    seconds = _timed(step, "cuda", 2, 5)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        queue.put({"processes": world, "train_ms": 1e3 * seconds,
                   "weights_equal_across_processes": all(torch.equal(gathered[0], g) for g in gathered[1:])})
    dist.destroy_process_group()


def ddp_rows(device: str, small: bool) -> list[dict]:
    if device != "cuda" or torch.cuda.device_count() < 2:
        have = torch.cuda.device_count() if device == "cuda" else 0
        return [{"error": f"not run: NCCL DDP with 2 processes needs 2 GPUs (one rank per device); {have} here"}]
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    _log("DDP 2 x NCCL ...")
    try:
        mp.spawn(_ddp_worker, args=(2, port, small, queue), nprocs=2, join=True)
        return [queue.get(timeout=60)]
    except Exception as exc:
        return [{"error": _first_line(exc)}]


# ----------------------------------------------------------------------------------------------------------- main


def _table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    def cell(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--small", action="store_true", help="toy sizes (a smoke run of the code, not a measurement)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--only", choices=("nonlocal", "model", "ddp"), help="run one section")
    p.add_argument("--out", help="also write the results as JSON here")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_cuda: no CUDA device here (torch.cuda.is_available() is False); "
              "use --device cpu --small for a smoke run", file=sys.stderr)
        raise SystemExit(1)
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
        where = f"{torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}, CUDA {torch.version.cuda}"
    else:
        where = f"CPU, {torch.get_num_threads()} threads"
    print(f"# nlvid CUDA checks (issue #17): torch {torch.__version__}, {where}, "
          f"{'toy sizes' if args.small else 'full sizes'}\n")
    results = {}
    sections = {"nonlocal": lambda: nonlocal_rows(args.device, args.small, args.warmup, args.reps),
                "model": lambda: model_rows(args.device, args.small, args.warmup, args.reps),
                "ddp": lambda: ddp_rows(args.device, args.small)}
    for name, run in sections.items():
        if args.only and name != args.only:
            continue
        results[name] = run()
        print(f"## {name}\n\n{_table(results[name])}\n", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"where": where, "results": results}, indent=1))


if __name__ == "__main__":
    main()
