"""`dfkd report RUN_DIR`: a run's summary, and PNGs of its last synthetic-image grid and its learning curves."""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dfkd.distributed import resume_command
from dfkd.errors import DfkdError
from dfkd.io import atomic_save_figure, atomic_save_png, image_free
from dfkd.runlog import parse_record, read_lines

IMAGE_TAG = "synthetic/images"

Series = dict[str, list[tuple[int, float]]]


@dataclass
class RunSummary:
    """What `dfkd report` says about a run; `text()` renders it."""

    run_dir: Path
    config: dict[str, Any]
    step: int
    elapsed: float | None
    finished: bool
    series: Series
    pngs: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)  # pictures in the folder dfkd did not draw: left as they are
    unwritten: list[str] = field(default_factory=list)  # pictures that could not be written, with why
    unreadable: int = 0  # lines of metrics.jsonl that are no JSON record (the last line, cut short, not counted)
    deploy: list[str] = field(default_factory=list)  # float vs int8 lines of a --quantize run (deploy.json)
    events: list[dict[str, Any]] = field(default_factory=list)

    def last(self, key: str) -> float | None:
        return self.series[key][-1][1] if self.series.get(key) else None

    def _resume(self) -> str:
        """The command that continues the run: under torchrun with the processes it was made with."""
        world = next((int(e.get("processes", 1)) for e in self.events if e.get("event") == "start"), 1)
        return resume_command(self.run_dir, world, bool(self.config.get("trust_pickle")))

    def _finished(self) -> str:
        from dfkd.modelfile import student_problem

        if not self.finished:
            if not (self.run_dir / "checkpoint.pt").exists():  # killed before its first checkpoint
                return ("no, and never started: stopped before its first checkpoint, nothing is kept (start it again; "
                        f"--out {self.run_dir} takes the folder again)")
            return f"no (continue with {self._resume()})"
        problem = student_problem(self.run_dir)
        return f"yes, but {problem} (train further to write it again: {self._resume()} --steps N, N > {self.step})" \
            if problem else "yes"

    def text(self) -> str:
        """The summary, one fact a line."""
        c = self.config
        minutes = c.get("budget_minutes")
        target = c.get("steps") or ("?" if not minutes else f"{minutes:g} min" if minutes >= 0.1 else
                                    f"{60 * minutes:.3g} s")  # "1e-09 min"
        lines = [f"run:      {self.run_dir}",
                 f"method:   {c.get('method')}   teacher: {' + '.join(map(str, _listed(c.get('teachers'))))}   "
                 f"student: {c.get('student')}",
                 f"steps:    {self.step} of {target}   time: {_duration(self.elapsed)}   "
                 f"finished: {self._finished()}"]
        top1, teacher = self.last("student/top1"), self.last("student/teacher_top1")
        written = self.last("student/top1_selected") if self.finished else None
        if top1 is not None:  # student/top1 is the last raw student's; student.pt may be the EMA or a snapshot
            fq = " (fake-quantized, as it trained)" if c.get("quantize") else ""  # student.pt: its float weights
            raw = f"; the last raw student{fq} {100 * top1:.2f}%" if written is not None and written != top1 else ""
            lines.append(f"accuracy: student top-1 {100 * (top1 if written is None else written):.2f}%" +
                         (f" (teacher {100 * teacher:.2f}%{raw})" if teacher is not None else
                          f" ({raw[2:]})" if raw else ""))
        if self.unreadable:
            log = self.run_dir / "metrics.jsonl"
            lines.append(f"log:      {self.unreadable} line(s) of {log} are not JSON records (not as dfkd wrote it): "
                         "the numbers here leave them out")
        lines += self._watch_lines()
        fids = [f"{k.removeprefix('fid/')} {v[-1][1]:.4g} (step {v[0][0]}: {v[0][1]:.4g})"
                for k, v in sorted(self.series.items()) if k.startswith("fid/")]
        if fids:
            lines.append("FID:      " + ", ".join(fids))
        lines += [f"int8:     {line}" for line in self.deploy]
        rss = self.last("perf/peak_rss_mib")
        if rss is not None:
            lines.append(f"memory:   peak RSS {rss:.0f} MiB")
        lines += _disk_lines(self.run_dir)
        if self.pngs:
            lines.append("wrote:    " + ", ".join(str(p) for p in self.pngs))
        if self.unwritten:
            lines.append("not written: " + "; ".join(self.unwritten))
        if self.kept:
            lines.append("kept:     " + ", ".join(str(p) for p in self.kept) + " (not marked as dfkd report's, so not "
                         "overwritten: a user's, or drawn by dfkd before 2026-12-07; move or delete it to have it "
                         "drawn)")
        return "\n".join(lines)

    def _watch_lines(self) -> list[str]:
        """How the teacher was read, the method's notes, the student's first weights, the selection and the warnings.

        The warnings: evaluation data the teacher does not recognise, collapse, stuck student, not learned.
        """
        lines = [f"note:     {e['message']}" for e in self.events if e.get("event") == "teacher_note"]
        said: dict[str, int] = {}  # what the method changed to fit the run (a cut recipe, a warm-up): each once
        for e in self.events:
            if e.get("event") == "note":
                said.setdefault(e["message"], e["step"])
        lines += [f"note:     step {step}: {message}" for message, step in said.items()]
        lines += [f"init:     {e['student_init']}" for e in self.events if e.get("event") == "start"
                  and e.get("student_init")]
        done = [e for e in self.events if e.get("event") == "finished" and e.get("selected")]
        if done:
            sel = self.last("student/top1_selected")
            lines.append(f"selected: {done[-1]['selected']}" +
                         (f" (test top-1 {100 * sel:.2f}%)" if sel is not None else ""))
        ema = self.last("student/top1_ema")
        if ema is not None:
            lines.append(f"EMA:      test top-1 {100 * ema:.2f}%")
        recovered = {e.get("since"): e["step"] for e in self.events if e.get("event") == "collapse_recovered"}
        for e in self.events:
            if e.get("event") in ("eval_doubt", "collapse", "student_stuck", "not_learned"):  # engine, watch, endcheck
                after = recovered.get(e["step"]) if e.get("event") == "collapse" else None
                end = " (end of run)" if e.get("at_end") else ""
                lines.append(f"warning:  step {e['step']}{end}: {e['message']}" +
                             ("" if after is None else f" [recovered by step {after}]"))
        return lines


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}h {m % 60:02d}m {s:02d}s" if m >= 60 else f"{m}m {s:02d}s"


def read_metrics(path: Path) -> tuple[Series, list[dict[str, Any]], int]:
    """metrics.jsonl -> ({key: [(step, value), ...]}, event records, how many lines were not records).

    A last line cut short (a run killed mid-write) is not counted: it is how a stopped run's log may end.
    """
    series: Series = {}
    events: list[dict[str, Any]] = []
    if not path.exists():
        return series, events, 0
    lines = read_lines(path)
    bad = 0
    for i, line in enumerate(lines):
        rec = parse_record(line)
        if rec is None:
            bad += bool(line.strip()) and i < len(lines) - 1
            continue
        if "event" in rec:
            events.append(rec)
            continue
        for k, v in rec.items():
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                series.setdefault(k, []).append((int(rec["step"]), float(v)))
    return series, events, bad


def _disk_lines(run_dir: Path) -> list[str]:
    """What the run keeps on disk beside its student: the pool or bank files, and the TensorBoard event files."""
    store = _bytes(run_dir.rglob("*-[0-9][0-9][0-9][0-9][0-9].bin"))
    events = _bytes(run_dir.glob("events.out.tfevents.*"))
    out = []
    if store:
        out.append(f"disk:     {_mib(store)} of synthetic images (pool/bank *.bin), kept so --resume can "
                   "continue the run with more steps; delete them if you will not continue it")
    if events >= 64 << 20:
        out.append(f"disk:     {_mib(events)} of TensorBoard events (mostly image grids, one every "
                   "image_every steps: a larger image_every in a --config file writes fewer)")
    return out


def _bytes(paths: Iterator[Path]) -> int:
    return sum(f.stat().st_size for f in paths if f.is_file())


def _listed(teachers: Any) -> list[Any]:
    """config.json's teachers as a list ('?' for none; a damaged entry is shown as it is)."""
    return (teachers or ["?"]) if isinstance(teachers, list) else [teachers]


def _mib(n: int) -> str:
    return f"{n / (1 << 20):,.1f} MiB"


def _deploy_lines(path: Path) -> list[str]:
    """The lines of a run's deploy.json (`dfkd export`'s measurements); a damaged one says so in one line."""
    from dfkd.deploystats import DeployStats

    try:
        return DeployStats(**json.loads(path.read_text())).lines()
    except (ValueError, TypeError, ZeroDivisionError) as e:  # (UnicodeDecodeError is a ValueError)
        return [f"{path}: unreadable ({str(e)[:120]}); `dfkd export` writes it again"]


def _run_state(run_dir: Path, series: Series, events: list[dict[str, Any]]) -> tuple[int, float | None, bool]:
    """(step, elapsed seconds, finished) from the checkpoint, else from metrics.jsonl."""
    from dfkd.checkpoint import load_checkpoint

    if (run_dir / "checkpoint.pt").exists():
        try:
            ckpt = load_checkpoint(run_dir / "checkpoint.pt")
            return int(ckpt["step"]), float(ckpt["elapsed"]), bool(ckpt["finished"])
        except DfkdError as e:  # (it checks the kinds of these entries) metrics.jsonl is still there to report from
            warnings.warn(f"{run_dir / 'checkpoint.pt'}: unreadable ({str(e)[:160]}); the step and state below are "
                          "read from metrics.jsonl, and --resume cannot continue from it", stacklevel=2)
    step = max([s for v in series.values() for s, _ in v] + [e.get("step", 0) for e in events] + [0])
    done = [e for e in events if e.get("event") == "finished"]
    return step, (done[-1].get("elapsed") if done else None), bool(done)


def write_last_grid(run_dir: Path, out: Path, tag: str = IMAGE_TAG, mark: str = "") -> bool:
    """The last image logged under `tag` in the run's TensorBoard events, as a PNG; False when there is none."""
    import io

    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    tb_log = logging.getLogger("tensorboard")
    level = tb_log.level
    tb_log.setLevel(logging.ERROR)  # a resumed run's events restart at its step: TensorBoard drops the replayed ones
    try:                            # and said "Detected out of order event.step ... Purging" on every report
        acc = EventAccumulator(str(run_dir), size_guidance={IMAGES: 0})
        acc.Reload()
    finally:
        tb_log.setLevel(level)
    # a run resumed and stopped before it logged an image: TensorBoard purged the replayed steps' images and kept the
    # tag with none (an IndexError traceback)
    if tag not in acc.Tags().get(IMAGES, []) or not acc.Images(tag):
        return False
    with Image.open(io.BytesIO(acc.Images(tag)[-1].encoded_image_string)) as im:
        atomic_save_png(im, out, mark)
    return True


def _panels(series: Series) -> list[tuple[str, list[str]]]:
    """Plot panels: losses by phase, student accuracy, then one panel per FID (their scales differ)."""
    groups: dict[str, list[str]] = {}
    for k in sorted(series):
        if k.startswith("loss/"):
            parts = k.split("/")
            groups.setdefault("loss/" + parts[1] if len(parts) > 2 else "loss", []).append(k)
    panels = list(groups.items())
    acc = [k for k in ("student/top1", "student/top5", "student/top1_ema") if k in series]
    if acc:
        panels.append(("student accuracy", acc))
    agree = [k for k in sorted(series) if k.startswith("select/agreement")]
    if agree:
        panels.append(("held-out agreement with the teacher", agree))
    kl = [k for k in sorted(series) if k.startswith("select/kl")]
    if kl:
        panels.append(("held-out KL from the teacher", kl))
    panels += [(k, [k]) for k in sorted(series) if k.startswith("fid/")]
    return panels


def write_curves(series: Series, out: Path, title: str = "", mark: str = "") -> bool:
    """Learning curves (matplotlib, Agg) of losses, accuracy and FIDs; False when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _panels(series)
    if not panels:
        return False
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    for ax, (name, keys) in zip(axes.flat, panels):
        for k in keys:
            steps, values = zip(*series[k])
            ax.plot(steps, values, label=k.rsplit("/", 1)[-1], marker="." if len(steps) < 30 else None)
        if name == "student accuracy" and series.get("student/teacher_top1"):
            ax.axhline(series["student/teacher_top1"][-1][1], color="grey", linestyle="--", label="teacher")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(ax.get_lines()) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    atomic_save_figure(fig, out, mark)
    plt.close(fig)
    return True


def report(run_dir: str | os.PathLike) -> RunSummary:
    """Summarise a run folder and write `synthetic.png` (last image grid) and `curves.png` into it.

    A file of either name that dfkd report did not draw (a user's) is left as it is and listed in `kept`.

    Raises:
        DfkdError: when the folder is not a dfkd run.
    """
    d = Path(run_dir)
    if not d.exists():
        raise DfkdError(f"{d}: no such run folder; give the folder `dfkd distill` wrote (or a transfer .npz)")
    if not (d / "config.json").is_file() or not any((d / f).is_file() for f in ("checkpoint.pt", "metrics.jsonl")):
        raise DfkdError(f"{d}: not a dfkd run folder (no config.json with checkpoint.pt or metrics.jsonl); give the "
                        "folder `dfkd distill` wrote")
    try:
        config = json.loads((d / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DfkdError(f"{d / 'config.json'}: not valid JSON ({str(e).splitlines()[0]}); it is not as dfkd "
                        "wrote it") from None
    if not isinstance(config, dict) or "method" not in config:
        raise DfkdError(f"{d / 'config.json'}: not a dfkd run config (no 'method'); give the folder `dfkd distill` "
                        "wrote")
    series, events, bad = read_metrics(d / "metrics.jsonl")
    summary = RunSummary(d, config, *_run_state(d, series, events), series, events=events, unreadable=bad)
    if (d / "deploy.json").is_file():
        summary.deploy = _deploy_lines(d / "deploy.json")
    teacher = Path(str(_listed(config.get("teachers"))[0])).name
    pictures = {"synthetic.png": lambda out, mark: write_last_grid(d, out, mark=mark),
                "curves.png": lambda out, mark: write_curves(series, out, f"{config.get('method')} on {teacher}",
                                                             mark)}
    for name, draw in pictures.items():
        out, mark = d / name, f"report {name}"  # no path: a moved run folder's pictures are still dfkd's
        if not image_free(out, mark):
            summary.kept.append(out)
            continue
        try:
            if draw(out, mark):
                summary.pngs.append(out)
        except (OSError, DfkdError) as e:  # a read-only run folder: the summary is still worth having
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).removeprefix(f"cannot write {out}: ")
            summary.unwritten.append(f"{out} ({why})")
    return summary
