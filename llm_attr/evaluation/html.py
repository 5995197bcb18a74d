"""`report.html`: one self-contained page of scored runs to look at (no network fetch: inline CSS, JS and SVG).

Per run and query: the query with its response, the top training examples with scores and texts, the distribution of
the query's scores over the training set (an SVG histogram; poisoned examples in red when the truth is known), and
with ground truth (`metadata.poisoned` in the training records, or a truth file) the query's AUPRC and precision@k.
A search box filters the queries by id and text; `report.html?q=TEXT` opens the page with that search.
"""

from __future__ import annotations

import html
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import DataError, RunDirError
from ..io import atomic_write_text
from .metrics import average_precision, precision_at_k

logger = logging.getLogger(__name__)

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:0;color:#1d2330;background:#f5f6f8}
header{position:sticky;top:0;background:#1d2330;color:#fff;padding:10px 20px;display:flex;gap:16px;align-items:center}
header h1{font-size:17px;margin:0;flex:1}
#search{font-size:14px;padding:6px 10px;width:340px;border-radius:4px;border:0}
#count{font-size:12px;opacity:.8}
main{padding:12px 20px}
h2{font-size:16px;margin:18px 0 6px}
.run-meta{color:#5a6272;font-size:12px;margin-bottom:8px}
.query{background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:12px 14px;margin:10px 0}
.query[hidden]{display:none}
.qhead{display:flex;gap:12px;align-items:baseline;flex-wrap:wrap}
.qid{font-weight:600;font-family:ui-monospace,monospace}
.metric{font-size:12px;background:#eef1f6;border-radius:10px;padding:1px 8px}
.text{white-space:pre-wrap;margin:4px 0}
.label{color:#5a6272;font-size:12px;text-transform:uppercase;letter-spacing:.04em}
.row{display:flex;gap:16px;align-items:flex-start}
.row table{flex:1}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{text-align:left;padding:3px 6px;border-bottom:1px solid #eceff3;vertical-align:top}
td.num{text-align:right;font-family:ui-monospace,monospace;white-space:nowrap}
td.tid{font-family:ui-monospace,monospace;white-space:nowrap}
tr.poisoned td{background:#fdecec}
.flag{color:#c62828;font-weight:600}
svg{flex:none}
"""

SCRIPT = """
const box = document.getElementById('search');
const queries = Array.from(document.querySelectorAll('.query'));
function apply() {
  const q = box.value.trim().toLowerCase();
  let shown = 0;
  for (const el of queries) {
    const hit = !q || el.dataset.search.includes(q);
    el.hidden = !hit;
    if (hit) shown++;
  }
  document.getElementById('count').textContent = shown + ' of ' + queries.length + ' queries';
}
box.addEventListener('input', apply);
const initial = new URLSearchParams(location.search).get('q');
if (initial) box.value = initial;
apply();
"""


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def read_truth(path: str | os.PathLike) -> set[str]:
    """Ids of the relevant (e.g. poisoned) training examples: a JSON list, or a text file with one id per line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise DataError(f"{path}: cannot read the truth file ({e.strerror})") from None
    if text.lstrip().startswith("["):
        try:
            ids = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(ids, list):
            raise DataError(f"{path}: expected a JSON list of training ids")
        return {str(i) for i in ids}
    return {line.strip() for line in text.splitlines() if line.strip()}


def _histogram(values: np.ndarray, relevant: np.ndarray | None, width: int = 260, height: int = 120) -> str:
    """An inline SVG histogram of one query's scores over the training set (relevant examples stacked in red)."""
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        hi = lo + 1.0
    bins = np.linspace(lo, hi, 31)
    all_counts, _ = np.histogram(values, bins)
    red = np.histogram(values[relevant], bins)[0] if relevant is not None else np.zeros_like(all_counts)
    top = max(int(all_counts.max()), 1)
    plot_h, bar_w = height - 22, width / len(all_counts)
    bars = []
    for i, (n, r) in enumerate(zip(all_counts, red, strict=True)):
        x = i * bar_w
        for count, colour, base in ((n - r, "#5b7bd5", 0), (r, "#d64545", n - r)):
            if count:
                h = plot_h * count / top
                y = plot_h - plot_h * (base + count) / top
                bars.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w - 1:.1f}" height="{h:.1f}" '
                            f'fill="{colour}"/>')
    return (f'<svg class="hist" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="score distribution">{"".join(bars)}'
            f'<line x1="0" y1="{plot_h}" x2="{width}" y2="{plot_h}" stroke="#888"/>'
            f'<text x="0" y="{height - 4}" font-size="10">{lo:.3g}</text>'
            f'<text x="{width}" y="{height - 4}" font-size="10" text-anchor="end">{hi:.3g}</text>'
            f'<text x="{width / 2}" y="{height - 4}" font-size="10" text-anchor="middle">score</text></svg>')


def _load_jsonl(path: Path | None) -> list[dict]:
    if path is None:
        return []
    from ..data.records import load_records

    return [r.to_dict() for r in load_records(path, columns={}, chat={})]


def _text(record: dict | None) -> tuple[str, str]:
    """(prompt, response) of a raw record dict."""
    if record is None:
        return "", ""
    if record.get("messages"):
        msgs = record["messages"]
        return "\n".join(m["content"] for m in msgs[:-1]), msgs[-1]["content"]
    return record.get("prompt") or "", record.get("response") or ""


def _run_section(run: Path, top_k: int, truth: set[str] | None, ks: Sequence[int]) -> tuple[str, int]:
    """The HTML of one scored run and its number of queries."""
    from ..results import AttributionResult
    from ..store import run_input

    result = AttributionResult(run)
    scores = np.asarray(result.scores_array, dtype=np.float64)
    query_ids, train_ids = result.query_ids, result.train_ids
    train = {r["id"]: r for r in _load_jsonl(run_input(run, "train"))}
    query = {r["id"]: r for r in _load_jsonl(run_input(run, "query"))}
    source = "truth file"
    if truth is None and train and any("poisoned" in (r.get("metadata") or {}) for r in train.values()):
        truth = {i for i, r in train.items() if (r.get("metadata") or {}).get("poisoned")}
        source = "metadata.poisoned"
    relevant = np.array([t in truth for t in train_ids]) if truth is not None else None
    method = ""
    manifest = run / "manifest.json"
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        method = f"{m.get('method', '')} {m.get('config', {}).get('method', '')}".strip()
    span = json.loads((run / "scores.json").read_text()).get("query_span") if (run / "scores.json").is_file() else None
    if span:
        method += f" · query span {span!r} (marked)"
    parts = [f'<section class="run"><h2>{_esc(run.name)}</h2><div class="run-meta">{_esc(run)} · {_esc(method)} · '
             f"{len(query_ids)} queries × {len(train_ids)} training examples"]
    if relevant is not None:
        parts.append(f" · ground truth ({source}): {int(relevant.sum())} relevant")
    parts.append("</div>")
    for qi, qid in enumerate(query_ids):
        values = scores[qi]
        prompt, response = _text(query.get(qid))
        metrics = []
        if relevant is not None and relevant.any():
            metrics.append(f'<span class="metric">AUPRC {average_precision(values, relevant):.3f}</span>')
            metrics += [f'<span class="metric">P@{k} {precision_at_k(values, relevant, k):.2f}</span>' for k in ks]
        order = np.argsort(-values, kind="stable")[:top_k]
        rows = []
        for rank, j in enumerate(order, start=1):
            tid = train_ids[j]
            tp, tr = _text(train.get(tid))
            bad = relevant is not None and relevant[j]
            flag = ' <span class="flag">poisoned</span>' if bad else ""
            rows.append(f'<tr class="{"poisoned" if bad else ""}" data-train-id="{_esc(tid)}"><td class="num">{rank}'
                        f'</td><td class="tid">{_esc(tid)}{flag}</td><td class="num">{values[j]:.4g}</td>'
                        f'<td><div class="text">{_esc(tp)}</div><div class="text">→ {_esc(tr)}</div></td></tr>')
        search = f"{qid}\n{prompt}\n{response}".lower()
        parts.append(
            f'<article class="query" data-query-id="{_esc(qid)}" data-search="{_esc(search)}">'
            f'<div class="qhead"><span class="label">query</span><span class="qid">{_esc(qid)}</span>{"".join(metrics)}'
            f'</div><div class="text"><span class="label">prompt</span> {_esc(prompt)}</div>'
            f'<div class="text"><span class="label">response</span> {_marked(query.get(qid), response, span)}</div>'
            f'<div class="row"><table><thead><tr><th>rank</th><th>train id</th><th>score</th><th>training example'
            f'</th></tr></thead><tbody>{"".join(rows)}</tbody></table>'
            f'{_histogram(values, relevant)}</div></article>')
    parts.append("</section>")
    return "".join(parts), len(query_ids)


def _marked(record: dict | None, response: str, span: str | None) -> str:
    """The response, escaped, with the measured span in `<mark>` (the whole response: unmarked)."""
    if not span or record is None:
        return _esc(response)
    from ..data.records import record_from_dict
    from ..data.spans import split_span

    before, inside, after = split_span(record_from_dict(record, "query"), span)
    return f"{_esc(before)}<mark>{_esc(inside)}</mark>{_esc(after)}"


def is_scored_run(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "scores.safetensors").is_file() and (p / "ids.json").is_file()


def write_html_report(runs: Sequence[str | os.PathLike], out: str | os.PathLike, *, top_k: int = 10,
                      truth: str | os.PathLike | None = None, ks: Sequence[int] = (5, 10)) -> Path:
    """Write `out/report.html` for the scored run directories `runs`; returns its path.

    truth: a file of relevant training ids (JSON list or one per line); default: `metadata.poisoned` of the run's
    training records, when they carry it.
    """
    runs = [Path(r) for r in runs]
    for r in runs:
        if not is_scored_run(r):
            raise RunDirError(f"{r}: not a scored run (no scores.safetensors and ids.json); score it with "
                              f"`llm-attr score {r}`")
    relevant = read_truth(truth) if truth is not None else None
    sections, n = [], 0
    for r in runs:
        section, count = _run_section(r, top_k, relevant, ks)
        sections.append(section)
        n += count
    page = ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>llm_attr report</title>"
            f"<style>{STYLE}</style></head><body><header><h1>llm_attr attribution report</h1>"
            '<input id="search" type="search" placeholder="search query ids and text" autofocus>'
            f'<span id="count">{n} queries</span></header><main>{"".join(sections)}</main>'
            f"<script>{SCRIPT}</script></body></html>\n")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.html"
    atomic_write_text(path, page)
    logger.info("wrote %s (%d runs, %d queries)", path, len(runs), n)
    return path
