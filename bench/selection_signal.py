"""Does the data-free selection signal track real accuracy? Every candidate a run could write, scored both ways.

    OMP_NUM_THREADS=1 python bench/selection_signal.py --teacher examples/mnist_lenet5.pt \
        --data examples/mnist_test.npz --method dfad --minutes 3 [--seed 0] [--json OUT.json] [-- DISTILL-FLAGS...]

Runs `dfkd distill` in this process (`--budget-clock cpu`, no run folder kept) with the selection's held-out check
wrapped: at every check the raw student and its EMA are copied (in memory). At the end of the run, on the run's
final held-out set of teacher-labelled synthetic images (dfkd.selection), every copy is scored by each candidate
signal below and by its real top-1 on `--data`. Printed per signal: the Spearman rank correlation between the
signal and real top-1 over the copies, the real top-1 of the copy the signal ranks first, and of the student
the end-of-run rule would write with that signal (the better of final raw and final EMA, or the best earlier copy
when it scores over 1 point more), against the best copy's and the final raw student's.

Signals (teacher labels are its arg-max on each held-out image; p_t, p_s the softmax outputs):

- `balanced`: top-1 agreement averaged per teacher class (dfkd's `-p select_signal=agreement`, its default
  until 2026-12-07),
- `top1`: plain top-1 agreement,
- `confident`: `balanced` on the images the teacher gives at least 0.9 (all images when fewer than 64 are),
- `weighted`: top-1 agreement weighted per image by the teacher's confidence max p_t,
- `soft`: the teacher's probability of the student's answer, p_t[argmax p_s], averaged,
- `neg_kl`: -KL(p_t || p_s), averaged (dfkd's default, `-p select_signal=kl`).

The README's *Data-free selection signal* table is twelve such runs (dafl, dfad, dfq, zskt on three teachers).

Only the methods with a held-out set (the GAN generators: dafl, dfad, dfq, online, zskt) have checks to wrap.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from dfkd.cli.main import main as dfkd_main
from dfkd.evaluate import accuracy
from dfkd.runwatch import RunWatch
from dfkd.selection import Selector, class_balanced_agreement
from dfkd.watch import eval_logits

MARGIN = 0.01  # dfkd's select_margin default


def _balanced(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    labels = t.argmax(1)
    if mask is not None and int(mask.sum()) >= 64:
        s, labels = s[mask], labels[mask]
    return class_balanced_agreement(s, labels, t.shape[1])


SIGNALS: dict[str, Callable[[torch.Tensor, torch.Tensor], float]] = {
    "balanced": _balanced,
    "top1": lambda s, t: float((s.argmax(1) == t.argmax(1)).float().mean()),
    "confident": lambda s, t: _balanced(s, t, t.softmax(1).amax(1) >= 0.9),
    "weighted": lambda s, t: float(((s.argmax(1) == t.argmax(1)).float() * t.softmax(1).amax(1)).sum()
                                   / t.softmax(1).amax(1).sum()),
    "soft": lambda s, t: float(t.softmax(1).gather(1, s.argmax(1, keepdim=True)).mean()),
    "neg_kl": lambda s, t: -float(F.kl_div(s.log_softmax(1), t.log_softmax(1), log_target=True,
                                           reduction="batchmean")),
}


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(v: list[float]) -> torch.Tensor:
        x = torch.tensor(v, dtype=torch.float64)
        order = x.argsort()
        r = torch.empty_like(x)
        r[order] = torch.arange(len(x), dtype=torch.float64)
        for value in x.unique():  # ties share their mean rank
            tie = x == value
            r[tie] = r[tie].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denom if denom else 0.0


class Recorder:
    """Copies of the raw student and the EMA at every held-out check, and the end-of-run scores."""

    def __init__(self) -> None:
        self.copies: list[tuple[str, int, dict[str, torch.Tensor]]] = []
        self.result: dict[str, Any] | None = None

    def install(self) -> None:
        check, finish = Selector.check, RunWatch.finish
        recorder = self

        def wrapped_check(selector: Selector, step: int) -> dict[str, float]:
            scores = check(selector, step)
            if scores:
                for name, model in selector.candidates():
                    if name != "best":
                        recorder.copies.append((name, step, copy.deepcopy(model.state_dict())))
            return scores

        def wrapped_finish(watch: RunWatch, log: Any, final: dict[str, float]) -> Any:
            recorder.result = recorder.score(watch)
            return finish(watch, log, final)

        Selector.check, RunWatch.finish = wrapped_check, wrapped_finish  # type: ignore[method-assign]

    def score(self, watch: RunWatch) -> dict[str, Any]:
        run, selector = watch.run, watch.selector
        if selector.heldout is None or not len(selector.heldout) or run.eval_data is None:
            raise SystemExit("no held-out set or no eval data: use a GAN method (dafl, dfad, dfq, online, zskt)")
        checked_last = any(step == run.step for _, step, _ in self.copies)  # a check at the run's last step
        final = [] if checked_last else [(name, run.step, copy.deepcopy(m.state_dict()))
                                         for name, m in selector.candidates() if name != "best"]
        n = min(selector.heldout.seen, selector.heldout.size)
        x = selector.heldout.x[:n]
        t_logits = selector.heldout.logits[:n]  # the teacher's, kept with the set
        model = copy.deepcopy(run.method.student)
        rows = []
        for name, step, state in self.copies + final:
            model.load_state_dict(state)
            s_logits = eval_logits(model, x).float()
            real = accuracy(model, run.eval_data, run.teacher.spec, run.device)["top1"]
            rows.append({"kind": name, "step": step, "real": real,
                         **{k: fn(s_logits, t_logits) for k, fn in SIGNALS.items()}})
        return {"rows": rows, "heldout": n, "steps": run.step}


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per signal: rank correlation, the top-ranked copy's top-1, and what the end-of-run rule would write."""
    final_step = max(r["step"] for r in rows)
    finals = [r for r in rows if r["step"] == final_step]
    out = []
    for key in SIGNALS:
        top = max(rows, key=lambda r: r[key])
        end = max(finals, key=lambda r: r[key])
        earlier = max((r for r in rows if r["step"] < final_step), key=lambda r: r[key], default=None)
        written = earlier if earlier is not None and earlier[key] > end[key] + MARGIN else end
        out.append({"signal": key, "spearman": spearman([r[key] for r in rows], [r["real"] for r in rows]),
                    "top_ranked": top["real"], "written": written["real"],
                    "written_is": f"{written['kind']}@{written['step']}"})
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--data", required=True, help="real test data: scores the copies, never trains them")
    ap.add_argument("--method", required=True)
    ap.add_argument("--minutes", type=float, default=3.0, help="CPU-minutes of the run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the rows and the summary here")
    ap.add_argument("extra", nargs="*", help="more `dfkd distill` flags, after `--`")
    a = ap.parse_args(argv)
    recorder = Recorder()
    recorder.install()
    with tempfile.TemporaryDirectory() as tmp:
        args = ["distill", "--teacher", a.teacher, "--method", a.method, "--eval-data", a.data,
                "--budget-minutes", str(a.minutes), "--budget-clock", "cpu", "--eval-every", "1000000",
                "--seed", str(a.seed), "--out", f"{tmp}/run", *a.extra]
        try:
            dfkd_main(args, standalone_mode=False)
        except SystemExit as e:
            if e.code:
                raise
    if recorder.result is None:
        raise SystemExit("the run ended without the end-of-run selection")
    rows = recorder.result["rows"]
    summary = summarise(rows)
    best = max(r["real"] for r in rows)
    raw = next(r["real"] for r in rows if r["step"] == recorder.result["steps"] and r["kind"] == "raw")
    print(f"\n{a.method} on {a.teacher}: {len(rows)} copies over {recorder.result['steps']} steps, held-out set "
          f"{recorder.result['heldout']}; best copy {100 * best:.2f} %, final raw {100 * raw:.2f} %\n")
    print("| signal | Spearman vs real top-1 | top-ranked copy's top-1 | written by the end rule |")
    print("|---|---|---|---|")
    for s in summary:
        print(f"| {s['signal']} | {s['spearman']:.2f} | {100 * s['top_ranked']:.2f} | "
              f"{100 * s['written']:.2f} ({s['written_is']}) |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"teacher": a.teacher, "method": a.method, "minutes": a.minutes, "seed": a.seed,
                       "rows": rows, "summary": summary, "best": best, "final_raw": raw}, f, indent=1)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
