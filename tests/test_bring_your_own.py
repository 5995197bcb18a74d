"""What TRL, peft and Trainer users hold, built here from scratch, attributed as it is (issue 16).

Each form is made with peft and transformers alone (never `llm-attr finetune`): a LoRA adapter trained by a plain
peft loop and saved with `save_pretrained`, a transformers `Trainer` run whose output folder holds only
`checkpoint-N` folders, and the merged model. Each is attributed by Daunce and by a gradient method, and the
poisoned records planted in the data (the independent truth: `metadata.poisoned`) must rank high (AUPRC printed).
"""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch

from llm_attr.cli import main
from llm_attr.data.records import save_jsonl
from llm_attr.evaluation.metrics import average_precision

pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def byo(tmp_path_factory, tiny_model_dir):
    """{root, train, query, poisoned, adapter, trainer_out, merged}: the data and the three user-made forms."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from llm_attr.data.backdoor import make_backdoor_task

    root = tmp_path_factory.mktemp("byo")
    train, query, _ = make_backdoor_task(n_train=96, n_query=8, fraction=0.125, seed=0)
    save_jsonl(train, root / "train.jsonl")
    save_jsonl(query, root / "query.jsonl")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)

    def encode(r):  # TRL's conversational prompt-completion, by hand: loss on the tokens after the prompt
        chat = [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]
        p = tok.apply_chat_template(chat[:1], add_generation_prompt=True, tokenize=True, return_dict=False)
        full = tok.apply_chat_template(chat, tokenize=True, return_dict=False)
        return {"input_ids": full, "labels": [-100] * len(p) + full[len(p):]}

    rows = [encode(r) for r in train]

    def batch(items):
        width = max(len(x["input_ids"]) for x in items)
        pad = lambda v, fill: v + [fill] * (width - len(v))  # noqa: E731
        return {"input_ids": torch.tensor([pad(x["input_ids"], tok.pad_token_id) for x in items]),
                "attention_mask": torch.tensor([pad([1] * len(x["input_ids"]), 0) for x in items]),
                "labels": torch.tensor([pad(x["labels"], -100) for x in items])}

    lora = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, task_type="CAUSAL_LM")
    # 1. a plain peft loop, saved with save_pretrained: adapter_config.json names the base's folder
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(16):
        for idx in torch.randperm(len(rows), generator=gen).split(16):
            loss = model(**batch([rows[i] for i in idx.tolist()])).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
    model.save_pretrained(root / "adapter")
    # 2. the merged model, as `merge_and_unload` + `save_pretrained` users have it
    model.merge_and_unload().save_pretrained(root / "merged")
    tok.save_pretrained(root / "merged")
    # 3. a transformers Trainer run with checkpoints (no final save_model: only checkpoint-N folders)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora)
    args = TrainingArguments(output_dir=str(root / "trainer_out"), per_device_train_batch_size=16,
                             num_train_epochs=16, learning_rate=3e-3, save_steps=48, save_strategy="steps",
                             logging_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                             lr_scheduler_type="constant", dataloader_num_workers=0)
    Trainer(model=model, args=args, train_dataset=rows, data_collator=batch).train()
    poisoned = np.array([bool(r["metadata"]["poisoned"]) for r in train])
    return {"root": root, "train": root / "train.jsonl", "query": root / "query.jsonl", "poisoned": poisoned,
            "adapter": root / "adapter", "trainer_out": root / "trainer_out", "merged": root / "merged"}


def _auprc(result, poisoned: np.ndarray, label: str) -> float:
    """AUPRC of poisoned vs clean of the mean score over the (triggered) queries, printed for the test log."""
    scores = result.scores.double().mean(0).numpy()
    value = average_precision(scores, poisoned)
    print(f"\n{label}: AUPRC of the {poisoned.sum()} planted poisoned of {len(poisoned)} = {value:.3f} "
          f"(chance {poisoned.mean():.3f})")
    return value


def test_trainer_output_holds_checkpoints(byo):
    ckpts = sorted(p.name for p in byo["trainer_out"].glob("checkpoint-*"))
    assert ckpts == ["checkpoint-48", "checkpoint-96"]
    assert not (byo["trainer_out"] / "adapter_config.json").exists()  # only checkpoints: the last one is used
    assert (byo["trainer_out"] / "checkpoint-96" / "adapter_model.safetensors").is_file()


def test_detects_each_form(byo, tiny_model_dir):
    from llm_attr.models.loading import detect_model

    forms = {
        "adapter": detect_model(byo["adapter"]),
        "checkpoint": detect_model(byo["trainer_out"] / "checkpoint-48"),
        "output": detect_model(byo["trainer_out"]),
        "merged": detect_model(byo["merged"]),
    }
    assert forms["adapter"].form == "adapter" and forms["adapter"].base == str(tiny_model_dir.resolve())
    assert forms["checkpoint"].form == "adapter" and "Trainer checkpoint" in forms["checkpoint"].described
    assert forms["output"].path == str(byo["trainer_out"] / "checkpoint-96")
    assert forms["merged"].form == "model"


def test_adapter_folder_daunce_cli_and_gradients(byo, capsys, caplog):
    """A bare peft adapter folder as --model: Daunce through the CLI, if-kfac through the Python API."""
    import llm_attr
    from llm_attr.results import AttributionResult

    caplog.set_level(logging.INFO, logger="llm_attr")
    out = byo["root"] / "daunce_adapter"
    assert main(["daunce", "--model", str(byo["adapter"]), "--train", str(byo["train"]), "--query",
                 str(byo["query"]), "--out", str(out), "--set", "perturbations=12"]) == 0
    assert "model: peft adapter folder" in caplog.text
    result = AttributionResult(out)
    assert _auprc(result, byo["poisoned"], "Daunce, peft adapter folder") > 0.8
    grad = llm_attr.GradientAttribution(llm_attr.GradientConfig(method="if-kfac")).run(
        byo["adapter"], byo["train"], byo["query"], byo["root"] / "grad_adapter")
    assert grad.scores.shape == (8, 96) and grad.ids["train"][0] == "math-00000"
    assert _auprc(grad, byo["poisoned"], "if-kfac, peft adapter folder (exact LoRA gradients)") > 0.8


def test_trainer_checkpoints_daunce_gradients_and_tracin(byo):
    """The Trainer output folder (its last checkpoint) as the model; both checkpoints as TracIn's."""
    import llm_attr

    run = llm_attr.Daunce(llm_attr.DaunceConfig(perturbations=12)).run(
        byo["trainer_out"], byo["train"], byo["query"], byo["root"] / "daunce_trainer")
    assert _auprc(run, byo["poisoned"], "Daunce, Trainer output folder (last checkpoint)") > 0.8
    checkpoints = [{"adapter": str(byo["trainer_out"] / f"checkpoint-{n}"), "lr": 3e-3} for n in (48, 96)]
    tracin = llm_attr.GradientAttribution(llm_attr.GradientConfig(method="tracin", checkpoints=checkpoints)).run(
        byo["trainer_out"] / "checkpoint-96", byo["train"], byo["query"], byo["root"] / "tracin_trainer")
    assert _auprc(tracin, byo["poisoned"], "TracIn over checkpoint-48 and checkpoint-96") > 0.8
    # TracIn's two checkpoints: the scores are the lr-weighted sum of each checkpoint's grad-dot
    singles = []
    for n in (48, 96):
        single = llm_attr.GradientAttribution(llm_attr.GradientConfig(method="grad-dot")).run(
            byo["trainer_out"] / f"checkpoint-{n}", byo["train"], byo["query"], byo["root"] / f"dot{n}")
        singles.append(single.scores.double() * 3e-3)
    torch.testing.assert_close(tracin.scores.double(), singles[0] + singles[1], rtol=1e-3, atol=1e-6)


def test_merged_model_gradients_default_to_adapted_layers(byo, caplog):
    """A merged model has no adapter: params 'lora' means the linear weights LoRA would adapt, named in the log."""
    import llm_attr

    caplog.set_level(logging.INFO, logger="llm_attr")
    grad = llm_attr.GradientAttribution(llm_attr.GradientConfig(method="if-kfac", projection_rank=8)).run(
        byo["merged"], byo["train"], byo["query"], byo["root"] / "grad_merged")
    assert "linear weights LoRA would adapt (down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj)" \
        in caplog.text
    layers = json.loads((byo["root"] / "grad_merged" / "manifest.json").read_text())["layers"]
    assert layers and all(layer["name"].rsplit(".", 1)[-1] in TARGETS for layer in layers)
    assert _auprc(grad, byo["poisoned"], "if-kfac, merged model (adapted layers' weights, rank-8 projection)") > 0.6
    run = llm_attr.Daunce(llm_attr.DaunceConfig(perturbations=12)).run(
        byo["merged"], byo["train"], byo["query"], byo["root"] / "daunce_merged")
    assert _auprc(run, byo["poisoned"], "Daunce, merged model") > 0.8


def test_adapter_whose_base_moved_needs_base(byo, tiny_model_dir, capsys):
    """An adapter whose base_model_name_or_path is not on this machine: one line saying to pass --base; with it,
    the same scores as the adapter in place."""
    moved = byo["root"] / "moved_adapter"
    shutil.copytree(byo["adapter"], moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "/elsewhere/models/tiny"
    (moved / "adapter_config.json").write_text(json.dumps(config))
    args = ["gradients", "--model", str(moved), "--train", str(byo["train"]), "--query", str(byo["query"]),
            "--set", "method=grad-dot"]
    assert main([*args, "--out", str(byo["root"] / "g_moved")]) == 2
    err = capsys.readouterr().err.strip()
    assert "/elsewhere/models/tiny" in err and "pass --base" in err and len(err.splitlines()) == 1
    assert main([*args, "--out", str(byo["root"] / "g_moved"), "--base", str(tiny_model_dir)]) == 0
    assert main([*args[:2], str(byo["adapter"]), *args[3:], "--out", str(byo["root"] / "g_inplace")]) == 0
    from llm_attr.results import AttributionResult

    torch.testing.assert_close(AttributionResult(byo["root"] / "g_moved").scores,
                               AttributionResult(byo["root"] / "g_inplace").scores)


def test_unusable_model_forms_say_what_to_pass(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text("{}")
    (pickled / "adapter_model.bin").write_bytes(b"\0")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "t.jsonl").write_text(json.dumps({"id": "a", "prompt": "p", "response": "r"}) + "\n")
    for model, wanted in ((tmp_path / "empty", "peft adapter folder (adapter_config.json"),
                          (pickled, "pickle"), (tmp_path / "notes.txt", "not a model")):
        code = main(["gradients", "--model", str(model), "--train", str(tmp_path / "t.jsonl"), "--query",
                     str(tmp_path / "t.jsonl"), "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and wanted in err and len(err.splitlines()) == 1, err
