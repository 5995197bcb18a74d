"""`llm-attr report RUN` writes one self-contained report.html: checked as HTML here, and in a real headless
Chromium (slow: `apt-get install chromium`), which also saves the screenshot in docs/img/report.png."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from llm_attr.cli import main
from llm_attr.data.records import save_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """(report.html, run dir, train records): a scored gradient run on backdoor data, reported by the CLI."""
    from llm_attr.data.backdoor import make_backdoor_task

    root = tmp_path_factory.mktemp("report")
    train, query, _ = make_backdoor_task(n_train=24, n_query=4, fraction=0.25, seed=2)
    save_jsonl(train, root / "train.jsonl")
    save_jsonl(query, root / "query.jsonl")
    run = root / "grad"
    assert main(["gradients", "--model", "builtin:tiny", "--train", str(root / "train.jsonl"), "--query",
                 str(root / "query.jsonl"), "--out", str(run), "--set", "method=grad-cos",
                 "--set", "projection_rank=8", "--set", "params=adapted"]) == 0
    assert main(["report", str(run), "--out", str(root / "rep"), "--top-k", "5"]) == 0
    return root / "rep" / "report.html", run, train


class Articles(HTMLParser):
    """Per query article: its id, hidden or not, the train ids of its rows in order, its metric badges."""

    def __init__(self):
        super().__init__()
        self.articles, self.current, self.in_metric, self.external = [], None, False, []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("src", "href"):
            if a.get(key):
                self.external.append(a[key])
        if tag == "article":
            self.current = {"id": a["data-query-id"], "hidden": "hidden" in a, "rows": [], "metrics": []}
            self.articles.append(self.current)
        elif tag == "tr" and self.current is not None and "data-train-id" in a:
            self.current["rows"].append(a["data-train-id"])
        elif tag == "span" and a.get("class") == "metric":
            self.in_metric = True

    def handle_data(self, data):
        if self.in_metric and self.current is not None:
            self.current["metrics"].append(data)
            self.in_metric = False


def _parse(text: str) -> Articles:
    parser = Articles()
    parser.feed(text)
    return parser


def test_report_html_is_self_contained_and_right(report):
    from sklearn.metrics import average_precision_score

    page, run, train = report
    text = page.read_text()
    parsed = _parse(text)
    assert not parsed.external and not re.search(r"https?://", text)  # nothing to fetch
    assert "<svg" in text and 'id="search"' in text
    scores = load_file(str(run / "scores.safetensors"))["scores"]
    poisoned = np.array([r["metadata"]["poisoned"] for r in train])
    assert [a["id"] for a in parsed.articles] == [f"query-{i:05d}" for i in range(4)]
    for qi, article in enumerate(parsed.articles):
        top = [train[j]["id"] for j in np.argsort(-scores[qi], kind="stable")[:5]]
        assert article["rows"] == top
        auprc = average_precision_score(poisoned, scores[qi])
        assert article["metrics"][0] == f"AUPRC {auprc:.3f}"
        assert article["metrics"][1] == f"P@5 {poisoned[np.argsort(-scores[qi], kind='stable')[:5]].mean():.2f}"


def test_report_html_truth_file(report, tmp_path):
    page, run, train = report
    (tmp_path / "truth.txt").write_text(f"{train[0]['id']}\n{train[1]['id']}\n")
    assert main(["report", str(run), "--out", str(tmp_path / "r"), "--truth", str(tmp_path / "truth.txt")]) == 0
    scores = load_file(str(run / "scores.safetensors"))["scores"]
    relevant = np.zeros(len(train), bool)
    relevant[:2] = True
    from llm_attr.evaluation.metrics import average_precision

    article = _parse((tmp_path / "r" / "report.html").read_text()).articles[0]
    assert article["metrics"][0] == f"AUPRC {average_precision(scores[0], relevant):.3f}"


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    assert found, "this test needs a headless browser: apt-get install -y chromium"
    return found


@pytest.mark.slow
def test_report_html_in_a_real_browser(report, tmp_path):
    """Chromium, network off, loads the page with a search for one query: that query's top training example is on
    the page, the other queries are hidden by the page's own script; a screenshot goes to docs/img/report.png."""
    page, run, train = report
    scores = load_file(str(run / "scores.safetensors"))["scores"]
    wanted = train[int(np.argmax(scores[2]))]["id"]
    browser = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--host-resolver-rules=MAP * ~NOTFOUND",
               f"--user-data-dir={tmp_path / 'profile'}"]
    url = f"{page.as_uri()}?q=query-00002"
    dom = subprocess.run([*browser, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True).stdout
    parsed = _parse(dom)
    shown = [a for a in parsed.articles if not a["hidden"]]
    assert [a["id"] for a in shown] == ["query-00002"] and len(parsed.articles) == 4
    assert shown[0]["rows"][0] == wanted
    assert "1 of 4 queries" in dom  # the script ran and counted
    shot = tmp_path / "report.png"
    subprocess.run([*browser, f"--screenshot={shot}", "--window-size=1280,900", "--hide-scrollbars", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    (REPO / "docs" / "img").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, REPO / "docs" / "img" / "report.png")
