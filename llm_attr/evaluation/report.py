"""`llm-attr report`: one Markdown report with tables and PNG plots from whatever evaluation JSON files exist, and
for scored run directories one self-contained `report.html` (`evaluation.html`).

Inputs are the files the `llm-attr eval ...` commands write (`lds.json`, `compare.json`, `backdoor.json`,
`removal.json`), given directly or found in the given directories. Their kind is read from their keys.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..io import atomic_write_text

logger = logging.getLogger(__name__)

EVAL_FILES = ("lds.json", "compare.json", "backdoor.json", "removal.json", "backdoor_removal.json")


def kind_of(result: dict[str, Any]) -> str | None:
    if "ground_truth" in result:
        return "lds"
    if "reference" in result and "budgets" in result:
        return "compare"
    if "n_poisoned" in result:
        return "backdoor"
    if "random" in result and "full" in result:
        return "removal"
    return None


def collect(paths: list[str | Path]) -> list[tuple[Path, str, dict[str, Any]]]:
    """(file, kind, content) of every evaluation JSON among `paths` (files, or directories searched one level)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            found.append(p)
        elif p.is_dir():
            found += [p / n for n in EVAL_FILES if (p / n).is_file()]
            found += [q / n for q in sorted(p.iterdir()) if q.is_dir() for n in EVAL_FILES if (q / n).is_file()]
    out = []
    for f in dict.fromkeys(found):
        data = json.loads(f.read_text())
        kind = kind_of(data)
        if kind is None:
            logger.warning("%s: not an evaluation output; skipped", f)
            continue
        out.append((f, kind, data))
    return out


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _lds(data: dict, png: Path) -> list[str]:
    plt = _plt()
    items = list(data["methods"].items()) + [("random", data["random"])]
    names = [n for n, _ in items]
    vals = [r["lds"] for _, r in items]
    err = [[r["lds"] - r["ci95"][0] for _, r in items], [r["ci95"][1] - r["lds"] for _, r in items]]
    fig, ax = plt.subplots(figsize=(1.2 * len(items) + 2, 3.5))
    ax.bar(range(len(items)), vals, yerr=err, capsize=4, color=["C0"] * (len(items) - 1) + ["grey"])
    ax.set_xticks(range(len(items)), names, rotation=30, ha="right", fontsize=8)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_ylabel("LDS (Spearman), 95% CI")
    ax.set_title(f"LDS over {data['subsets']} retrained subsets, {data['n_query']} queries")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    lines = ["| method | LDS | 95% CI |", "|---|---:|---|"]
    lines += [f"| {n} | {r['lds']:+.3f} | [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}] |" for n, r in items]
    return lines


def _compare(data: dict, png: Path) -> list[str]:
    plt = _plt()
    budgets = data["budgets"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for name, e in data["methods"].items():
        for ax, key in zip(axes, ("cosine", "spearman"), strict=True):
            m = [v[0] for v in e[key]]
            s = [v[1] for v in e[key]]
            ax.errorbar(budgets, m, yerr=s, marker="o", capsize=3, label=name)
    for ax, key in zip(axes, ("cosine", "Spearman"), strict=True):
        ax.set_xlabel("further-training budget (steps)")
        if budgets[0] > 0 and budgets[-1] / budgets[0] >= 8:
            ax.set_xscale("log")
        ax.set_ylabel(f"{key} with further training")
        ax.axhline(0, color="k", lw=0.5)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"agreement with further training ({data['n_left_out']} left-out examples, "
                 f"{data['n_query']} queries; mean ± s.e.m.)", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    lines = ["| method | " + " | ".join(f"cos@{b}" for b in budgets) + " | " +
             " | ".join(f"ρ@{b}" for b in budgets) + " |", "|---|" + "---:|" * (2 * len(budgets))]
    for name, e in data["methods"].items():
        cells = [f"{m:+.3f} ± {s:.3f}" for m, s in e["cosine"] + e["spearman"]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _backdoor(data: dict, png: Path) -> list[str]:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    for name, m in data["methods"].items():
        ax.plot(m["pr_curve"]["recall"], m["pr_curve"]["precision"], label=f"{name} (AP {m['auprc']:.2f})")
    ax.axhline(data["n_poisoned"] / data["n_train"], color="grey", ls="--", label="chance")
    ax.set_xlabel("recall of poisoned examples")
    ax.set_ylabel("precision")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    ks = data["ks"]
    lines = ["| method | AUPRC | " + " | ".join(f"P@{k} | R@{k}" for k in ks) + " |",
             "|---|---:|" + "---:|---:|" * len(ks)]
    for name, m in data["methods"].items():
        lines.append(f"| {name} | {m['auprc']:.3f} | " + " | ".join(
            f"{m[f'precision@{k}']:.3f} | {m[f'recall@{k}']:.3f}" for k in ks) + " |")
    lines.append(f"| chance | {data['n_poisoned'] / data['n_train']:.3f} |" + " |" * (2 * len(ks)))
    return lines


def _removal(data: dict, png: Path) -> list[str]:
    plt = _plt()
    ks = data["k"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    series = list(data["methods"].items()) + [("random", data["random"])]
    for name, entries in series:
        style = {"color": "grey", "ls": "--"} if name == "random" else {}
        axes[0].plot(ks, [e["success"] for e in entries], marker="o", label=name, **style)
        axes[1].plot(ks, [e["loss"] for e in entries], marker="o", label=name, **style)
    for ax, what in zip(axes, ("success rate", "mean query loss"), strict=True):
        ax.axhline(data["full"]["success" if what == "success rate" else "loss"], color="k", lw=0.5)
        ax.set_xlabel("training examples removed (k)")
        ax.set_ylabel(f"{data['task']} {what}")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    lines = ["| removal | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|" + "---:|" * len(ks),
             f"| none (full data: success {data['full']['success']:.3f}, loss {data['full']['loss']:.3f}) |" +
             " |" * len(ks)]
    for name, entries in series:
        lines.append(f"| {name} | " + " | ".join(f"{e['success']:.3f} / {e['loss']:.3f}" for e in entries) + " |")
    return lines


SECTIONS = {"lds": ("Linear datamodeling score", _lds), "compare": ("Agreement with further training", _compare),
            "backdoor": ("Backdoor retrieval", _backdoor), "removal": ("Removal of the top-k", _removal)}


def write_report(paths: list[str | Path], out: str | Path, *, top_k: int = 10, truth: str | Path | None = None
                 ) -> Path:
    """Write `out/report.md` and one PNG per evaluation found, and `out/report.html` (`html.write_html_report`)
    when scored run directories are among `paths`; returns the Markdown report's path."""
    from .html import is_scored_run, write_html_report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [p for p in paths if is_scored_run(p)]
    if runs:
        write_html_report(runs, out, top_k=top_k, truth=truth)  # logs its path
    lines = ["# Attribution evaluation report", ""]
    results = collect(paths)
    if not results:
        lines.append("No evaluation outputs found (run `llm-attr eval lds|compare|backdoor|removal` first).")
    for i, (path, kind, data) in enumerate(results):
        title, render = SECTIONS[kind]
        png = out / f"{i:02d}_{kind}.png"
        table = render(data, png)
        lines += [f"## {title}", "", f"Source: `{path}`", "", f"![{title}]({png.name})", "", *table, ""]
        if kind == "removal":
            lines += ["Cells: success rate / mean query loss after retraining from the base without the removed "
                      "examples.", ""]
    report = out / "report.md"
    atomic_write_text(report, "\n".join(lines) + "\n")
    logger.info("wrote %s (%d sections)", report, len(results))
    return report
