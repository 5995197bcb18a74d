"""Every ```python block of README.md runs as written, in order, on data made here; and the Python API's promises
(path-likes, result objects, notebook progress) hold."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

from llm_attr.data.records import save_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")
README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_readme_python_blocks_run_as_written(tmp_path, monkeypatch, capsys):
    from llm_attr.data.backdoor import make_backdoor_task

    blocks = python_blocks()
    assert blocks, "README.md has no python block"
    train, query, _ = make_backdoor_task(n_train=48, n_query=3, fraction=0.125, seed=3)
    save_jsonl(train, tmp_path / "train.jsonl")  # the names the README uses
    save_jsonl(query, tmp_path / "queries.jsonl")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)  # noqa: S102
    out = capsys.readouterr().out
    run, grad = namespace["run"], namespace["grad"]
    assert run.path.resolve() == tmp_path / "runs" / "d" and grad.path.resolve() == tmp_path / "runs" / "g"
    assert tuple(run.scores.shape) == (3, 48) and run.ids["train"] == [r["id"] for r in train]
    top = run.topk(query[0]["id"], k=5)
    assert str(top) in out and len(top) == 5
    # topk is the scores' own order: the row of the query, sorted (an independent read of the file)
    from safetensors.torch import load_file

    row = load_file(str(tmp_path / "runs" / "d" / "scores.safetensors"))["scores"][0]
    assert [s for _, s in top] == sorted(row.tolist(), reverse=True)[:5]
    assert (run / "topk.md").is_file()  # still the run directory as a path


def test_path_likes_everywhere(tmp_path, tiny_model_dir):
    """A Path for the model, the records and the output, and the result object passed on as a path."""
    import llm_attr
    from llm_attr.data.records import load_records
    from llm_attr.results import AttributionResult

    train, query, _ = __import__("llm_attr.data.backdoor", fromlist=["x"]).make_backdoor_task(
        n_train=8, n_query=2, fraction=0.25, seed=4)
    save_jsonl(train, tmp_path / "t.jsonl")
    save_jsonl(query, tmp_path / "q.jsonl")
    cfg = llm_attr.GradientConfig(method="grad-dot", projection_rank=4)
    result = llm_attr.GradientAttribution(cfg).run(tiny_model_dir, tmp_path / "t.jsonl", tmp_path / "q.jsonl",
                                                   tmp_path / "g")
    assert isinstance(result, AttributionResult) and Path(result) == tmp_path / "g"
    again = AttributionResult(result)  # a result is a path-like too
    assert again.ids == result.ids and len(load_records(result / "inputs" / "train.jsonl"
                                                        if (result / "inputs").is_dir() else result / "train.jsonl")) == 8


def test_progress_bars_show_in_a_notebook(monkeypatch):
    """In a Jupyter kernel (stderr is no TTY there) the bars are drawn (tqdm.auto: widgets), not disabled."""
    from llm_attr import utils

    monkeypatch.setenv("LLM_ATTR_PROGRESS", "1")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert utils.progress(range(3)).disable
    shell = type("ZMQInteractiveShell", (), {})()
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: shell))
    assert utils.in_notebook() and not utils.progress(range(3)).disable
