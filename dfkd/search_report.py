"""The results of `dfkd search`: every trial as a row, the Pareto set, `pareto.md` and `pareto.png`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dfkd.io import atomic_write_text


def trial_rows(study: Any) -> list[dict[str, Any]]:
    """Every trial that drew a student: number, state, student, arguments, parameters, latency and top-1.

    top-1 is None unless the trial completed; `same_as` is the earlier trial whose score it took (the same student,
    not distilled again).
    """
    rows = []
    for t in study.trials:
        if "params" not in t.user_attrs:
            continue
        rows.append({"trial": t.number, "state": t.state.name.lower(), "student": t.user_attrs["student"],
                     "student_args": t.user_attrs["student_args"], "params": int(t.user_attrs["params"]),
                     "latency_ms": float(t.user_attrs["latency_ms"]), "pruned": t.user_attrs.get("pruned"),
                     "same_as": t.user_attrs.get("same_as"), "diverged": t.user_attrs.get("diverged"),
                     "top1": float(t.value) if t.state.name == "COMPLETE" else None})
    return rows


def dominates(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """A is at least as good as b on accuracy, parameters and latency, and better on one."""
    ge = a["top1"] >= b["top1"] and a["params"] <= b["params"] and a["latency_ms"] <= b["latency_ms"]
    return ge and (a["top1"] > b["top1"] or a["params"] < b["params"] or a["latency_ms"] < b["latency_ms"])


def pareto_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The completed trials no other completed trial dominates, smallest first (a repeated student once)."""
    done = [r for r in rows if r["top1"] is not None and r.get("same_as") is None]
    return sorted((r for r in done if not any(dominates(o, r) for o in done)), key=lambda r: r["params"])


def table(rows: list[dict[str, Any]], pareto: list[dict[str, Any]], chosen: dict[str, Any]) -> str:
    """A Markdown table of every trial, Pareto rows marked, the chosen one in bold."""
    front = {r["trial"] for r in pareto}
    lines = ["| trial | student | arguments | parameters | latency ms | top-1 % | |", "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["params"]):
        acc = f"{100 * r['top1']:.2f}" if r["top1"] is not None else (
            f"pruned ({r['pruned']})" if r["state"] == "pruned" else
            f"diverged at step {r['diverged']}" if r.get("diverged") is not None else "failed or stopped")
        mark = "chosen" if r["trial"] == chosen["trial"] else ("Pareto" if r["trial"] in front else "")
        if r.get("same_as") is not None:
            mark = f"same student as trial {r['same_as']}"
        lines.append(f"| {r['trial']} | {r['student']} | {json.dumps(r['student_args'])} | {r['params']} | "
                     f"{r['latency_ms']:.3f} | {acc} | {mark} |")
    return "\n".join(lines) + "\n"


def plot(path: Path, rows: list[dict[str, Any]], pareto: list[dict[str, Any]]) -> None:
    """Accuracy against parameters: every completed trial, the Pareto front joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["top1"] is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([r["params"] for r in done], [100 * r["top1"] for r in done], c="0.6", label="trials")
    ax.plot([r["params"] for r in pareto], [100 * r["top1"] for r in pareto], "o-", c="C3", label="Pareto")
    ax.set_xscale("log")
    ax.set_xlabel("student parameters")
    ax.set_ylabel("top-1 % (eval data)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(out: Path, rows: list[dict[str, Any]], pareto: list[dict[str, Any]], chosen: dict[str, Any],
                 final: dict[str, float]) -> None:
    """`pareto.md` (table + chosen student + its full distillation) and `pareto.png` in `out`."""
    text = table(rows, pareto, chosen)
    if final:
        text += f"\nchosen: trial {chosen['trial']}, fully distilled in final/: top-1 {100 * final['top1']:.2f} %\n"
    atomic_write_text(out / "pareto.md", text)
    plot(out / "pareto.png", rows, pareto)
