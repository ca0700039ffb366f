"""`nlvid train DATA_DIR`: train a (Non-local) video classifier; `torchrun -m nlvid train ...` for several GPUs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from nlvid.cli.common import err_console, format_scan_table, out_console
from nlvid.cli.options import InitOption, PretrainedOption, SetOption, out_option, pretrained_init
from nlvid.cli.runs import draw_run_curves
from nlvid.config import load_config
from nlvid.engine.distributed import env_info
from nlvid.engine.runs import CURVES_FILE
from nlvid.engine.train import train as run_train
from nlvid.errors import ConfigError
from nlvid.models import list_models
from nlvid.models.zoo import config_overrides, get_entry
from nlvid.viz.curves import plotting_available


def _fmt_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


# config key -> the flag of this command that sets it (main() appends it to a keyed error)
KEY_FLAGS = {"init": "--init", "out": "--out", "pretrained": "--pretrained"}


class LineReporter:
    """Plain log lines on stderr (when stderr is not a terminal): every log_every steps and per epoch. With
    `curves`, also (re)draws the run folder's curves.png at every epoch end (a note instead when matplotlib is
    missing or the picture cannot be written: a picture never stops a run)."""

    def __init__(self, console=None, *, curves: bool = False):
        self.console = console or err_console
        self.epochs: list[dict[str, Any]] = []
        self.t0 = time.perf_counter()
        self.total_steps = 0
        self.first_step = 0
        self.curves = curves
        self.run_dir: Path | None = None
        self.title = ""
        self._scan_shown: dict[str, int] = {}  # split -> the last tenth of the scan reported

    def print(self, text: str) -> None:
        self.console.print(text, highlight=False, markup=False, soft_wrap=True)

    def __call__(self, event: str, **d: Any) -> None:
        """`progress(event, **data)` of the training loop -> `on_<event>(**data)`; other events are ignored."""
        getattr(self, f"on_{event}", lambda **_: None)(**d)

    def on_message(self, text: str) -> None:
        self.print(text)

    def on_scan_progress(self, split: str, done: int, total: int) -> None:
        """Files probed so far (a first scan of a large folder takes minutes): a line per 10% of the files.
        A scan answered by the cache calls this once with done == total and prints nothing."""
        if done == total and self._scan_shown.get(split) is None:
            return
        tenth = done * 10 // total
        if tenth > self._scan_shown.get(split, -1):
            self._scan_shown[split] = tenth
            self.print(f"scanning {split}: {done}/{total} files probed")

    def on_scan(self, split: str, index: Any) -> None:
        self.console.print(format_scan_table(index))

    def on_start(self, **d: Any) -> None:
        self.total_steps, self.first_step = d["total_steps"], d["step"]
        self.t0 = time.perf_counter()
        self.run_dir = Path(d["run_dir"])
        self.title = f"{self.run_dir.name}: {d['model']}, {d['epochs']} epochs of {d['steps_per_epoch']} steps"
        if self.curves and not plotting_available():
            self.curves = False
            self.print("curves.png is not drawn: matplotlib is not installed (pip install 'nlvid[plot]'); "
                       "metrics.jsonl has the same records")
        for line in d.get("init") or []:
            self.print(line)
        if d["resumed"] and d["start_epoch"] >= d["epochs"]:
            self.print(f"the run in {d['run_dir']} already finished its {d['epochs']} epochs: nothing to train "
                       f"(extend it with --set train.epochs=N)")
        elif d["resumed"]:
            self.print(f"resuming {d['run_dir']} from epoch {d['start_epoch'] + 1}, batch {d['start_batch']} "
                       f"(step {d['step']} of {d['total_steps']})")
        chosen = "validation video top-1" if d["metric"] == "val_top1" else "TRAIN accuracy (no validation data)"
        self.print(
            f"training {d['model']} on {d['num_train']} clips ({len(d['classes'])} classes), "
            f"validation {d['num_val']} videos; {d['epochs']} epochs x {d['steps_per_epoch']} steps, "
            f"global batch {d['global_batch']}, {d['world_size']} process(es) on {d['device']}; "
            f"best.pt chosen by {chosen}"
        )

    def _eta(self, step: int) -> str:
        done = step - self.first_step
        if done <= 0:
            return "?"
        rate = (time.perf_counter() - self.t0) / done
        return _fmt_eta(rate * (self.total_steps - step))

    def on_step(self, record: dict[str, Any], log: bool) -> None:
        if not log:
            return
        r = record
        self.print(f"epoch {r['epoch']} step {r['step']}/{self.total_steps} batch {r['batch']}/{r['batches']}  "
                   f"loss {r['loss']:.4f}  acc {100 * r['acc']:.1f}%  lr {r['lr']:.3g}  "
                   f"{r['clips_per_s']:.1f} clips/s  data {100 * r['data_fraction']:.0f}%  ETA {self._eta(r['step'])}")

    def on_epoch(self, record: dict[str, Any], metric: str) -> None:
        self.epochs.append(record)
        r = record
        val = f"  val top1 {100 * r['val_top1']:.1f}% top5 {100 * r['val_top5']:.1f}%" if "val_top1" in r else ""
        star = "  *best*" if r["is_best"] else ""
        self.print(f"epoch {r['epoch']} done: train loss {r['train_loss']:.4f} acc {100 * r['train_acc']:.1f}%{val}"
                   f"{star}  ETA {self._eta(r['step'])}")
        self.draw_curves()

    def draw_curves(self) -> None:
        if not self.curves or self.run_dir is None:
            return
        try:
            draw_run_curves(self.run_dir, title=self.title)
        except Exception as e:  # noqa: BLE001 - a picture (full disk, a plotting bug) must never stop training
            self.print(f"curves.png not updated: {str(e).splitlines()[0] if str(e) else type(e).__name__}")

    def on_end(self, result: dict[str, Any]) -> None:
        if self.epochs:
            self.console.print(epoch_table(self.epochs))
        else:
            self.draw_curves()  # a finished run resumed: nothing trained, the picture is drawn once anyway


def epoch_table(epochs: list[dict[str, Any]]):
    has_val = any("val_top1" in r for r in epochs)
    t = Table(title="epochs (loss/acc: train; val@1/@5: video top-1/5; clip@1: per view; class: mean class acc)",
              title_justify="left")
    # short headers: the table must fit an 80-column log
    for col in ["epoch", "loss", "acc"] + (["val@1", "val@5", "clip@1", "class"] if has_val else []) + ["lr", ""]:
        t.add_column(col, justify="right")
    for r in epochs:
        row = [str(r["epoch"]), f"{r['train_loss']:.4f}", f"{100 * r['train_acc']:.1f}%"]
        if has_val:
            row += [f"{100 * r[k]:.1f}%" if r.get(k) is not None else "-"
                    for k in ("val_top1", "val_top5", "val_clip_top1", "val_mean_class_acc")]
        row += [f"{r['lr']:.3g}", "*" if r.get("is_best") else ""]
        t.add_row(*row)
    return t


class RichReporter(LineReporter):
    """Progress bars (epoch and step: loss, acc, lr, clips/s, ETA) on a terminal."""

    def __init__(self, console=None, *, curves: bool = False):
        super().__init__(console, curves=curves)
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"), console=self.console, transient=False,
        )
        self.epoch_task = self.step_task = None
        self._scan_tasks: dict[str, Any] = {}

    def print(self, text: str) -> None:
        (self.progress.console if self.progress.live.is_started else self.console).print(
            text, highlight=False, markup=False, soft_wrap=True)

    def on_scan_progress(self, split: str, done: int, total: int) -> None:
        """A bar while files are probed; none for a scan answered by the cache (done == total at once)."""
        task = self._scan_tasks.get(split)
        if task is None:
            if done == total:
                return
            self.progress.start()
            task = self._scan_tasks[split] = self.progress.add_task(f"scanning {split}", total=total, info="files")
        self.progress.update(task, completed=done)
        if done == total:
            self.progress.remove_task(task)
            self.progress.stop()

    def on_start(self, **d: Any) -> None:
        super().on_start(**d)
        self.progress.start()
        self.epoch_task = self.progress.add_task("epochs", total=d["epochs"], completed=d["start_epoch"], info="")
        self.step_task = self.progress.add_task("steps", total=d["batches_per_epoch"], info="")

    def on_epoch_start(self, epoch: int, batches: int, first_batch: int, step: int) -> None:
        self.progress.update(self.step_task, total=batches, completed=first_batch,
                             description=f"epoch {epoch + 1}")

    def on_step(self, record: dict[str, Any], log: bool) -> None:
        r = record
        info = f"loss {r['loss']:.3f}  lr {r['lr']:.2g}"
        if "acc" in r:
            info += f"  acc {100 * r['acc']:.0f}%  {r['clips_per_s']:.1f} clips/s"
        self.progress.update(self.step_task, completed=r["batch"], info=info)

    def on_epoch(self, record: dict[str, Any], metric: str) -> None:
        super().on_epoch(record, metric)
        self.progress.update(self.epoch_task, completed=record["epoch"],
                             info=f"best {100 * max(record['best'], 0):.1f}%")

    def on_end(self, result: dict[str, Any]) -> None:
        self.progress.stop()
        super().on_end(result)


def make_reporter(*, curves: bool = True):
    return RichReporter(curves=curves) if err_console.is_terminal else LineReporter(curves=curves)


def train(
    data: Annotated[Path, typer.Argument(help="Videos: a folder per class, a root with train/ and val/, or an "
                                              "annotation list (.csv/.txt, 'path,label' per line).", show_default=False)],
    config: Annotated[Optional[str], typer.Option("--config", "-c", help="YAML file, bundled config (tiny) or "
                                                  "model preset (c2d_r50_nl5). Default: tiny.")] = None,
    val: Annotated[Optional[Path], typer.Option("--val", help="Validation videos (folder or list); implied by "
                                                "DATA/val.")] = None,
    out: Annotated[Optional[Path], out_option("Run folder. Default: runs/<config>-<timestamp>.")] = None,
    set_: SetOption = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last.pt "
                                         "(also automatic when --out already holds one).")] = False,
    init: InitOption = None,
    pretrained: PretrainedOption = None,
) -> None:
    """Train a video classifier; writes config.yaml, classes.txt, metrics.jsonl, curves.png, last.pt and best.pt
    into --out (one `nlvid train` per run folder at a time: a second one is refused while the first runs).

    Example: nlvid train my_videos/ --config tiny --out runs/tiny --set train.epochs=30

    Multi-GPU / multi-node: torchrun --nproc_per_node 8 -m nlvid train DATA --config c2d_r50_nl5 --out runs/x

    Fine-tuning published weights: nlvid train DATA --pretrained pysf_i3d_r50_nl_8x8 --out runs/ft

    Long clips in less memory: --set train.checkpoint=stages (recompute activations in backward), and for small
    batches --set model.bn=frozen (fixed BN statistics), e.g. --config i3d_r50_128x1_frozen_bn
    """
    resuming = resume or (out is not None and (out / "last.pt").exists())
    if resume and out is None:
        raise ConfigError("--resume needs --out RUN_DIR (the run folder to continue)")
    entry = get_entry(pretrained) if pretrained else None
    source: list[str] = []
    if entry is not None:
        if init is not None:
            raise ConfigError("give --init or --pretrained, not both")
        # the weights' architecture options, clip (frames x stride) and normalisation; with no --config also the
        # source's test views
        tied = ("model.", "data.num_frames=", "data.stride=", "data.mean=", "data.std=")
        source = [o for o in config_overrides(entry) if config is None or o.startswith(tied)]
    if resuming and config is None and not set_:
        cfg = None
    else:
        default = entry.preset if entry is not None else "tiny"
        cfg = load_config(config or default, source + list(set_ or []), model_names=list_models())
    if entry is not None and not resuming:
        init = pretrained_init(entry.name)  # type: ignore[assignment]
    if out is None:
        name = Path(config).stem if config else (entry.name if entry is not None else "tiny")
        out = Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    main = env_info().is_main
    if resuming and main:
        err_console.print(f"resuming the run in {out} from {out / 'last.pt'}", highlight=False, markup=False)
    result = run_train(cfg, data=data, val=val, out=out, resume=resume, init=str(init) if init else None,
                       progress=make_reporter() if main else None)
    if not main:
        return
    best = result["best_acc"]
    what = "validation video top-1" if result["best_metric"] == "val_top1" else "train accuracy (no validation data)"
    out_console.print(f"run folder: {result['run_dir']}", highlight=False, markup=False)
    out_console.print(f"best {what}: {100 * best:.1f}% (epoch {result['best_epoch']}) -> {result['best_path']}"
                      if best is not None else "no epoch finished", highlight=False, markup=False)
    out_console.print(f"last checkpoint: {result['last_path']} (step {result['steps']})", highlight=False,
                      markup=False)
    out_console.print(f"metrics: {result['metrics_path']}", highlight=False, markup=False)
    curves = Path(result["run_dir"]) / CURVES_FILE
    if curves.exists():
        out_console.print(f"curves: {curves}", highlight=False, markup=False)
