import argparse
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from qseg.cli import add_eval_arguments
from qseg.data import Example
from qseg.eval import (
    ANSWER_ROOM,
    answer_budget,
    evaluate,
    format_table,
    generate,
    run_eval,
)
from qseg.metrics import MATH_METRICS

SHARED_DATA = Path(__file__).parents[2] / "shared" / "data"

GSM8K_ROWS = [
    {
        "question": "Janet has 16 eggs and eats 3. How many are left?",
        "answer": "She has 16 - 3 = <<16-3=13>>13 eggs left.\n#### 13",
    },
    {
        "question": "A robe takes 2 bolts of blue and half that of white. How many in total?",
        "answer": "White: 2/2=<<2/2=1>>1\nTotal: 2+1=<<2+1=3>>3\n#### 3",
    },
    {"question": "What is 1,000 plus 1?", "answer": "<<1000+1=1001>>1001\n#### 1,001"},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()


class ScriptedModel(torch.nn.Module):
    """Continues every prompt with the same token ids; records what generate() received."""

    def __init__(self, continuation: list[int]) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the model a device
        self.continuation = continuation
        self.calls: list[dict] = []

    def generate(self, input_ids, attention_mask, max_new_tokens, **options):
        self.calls.append({"input_ids": input_ids, "attention_mask": attention_mask, **options})
        new = torch.tensor(self.continuation[:max_new_tokens]).expand(len(input_ids), -1)
        return torch.cat([input_ids, new], dim=1)


def gsm8k_examples(n: int) -> list[Example]:
    return [
        Example(f"Question: {row['question']}\nAnswer: ", row["answer"], row["answer"], "gsm8k")
        for row in GSM8K_ROWS[:n]
    ]


# --- generate -----------------------------------------------------------------------


def test_generate_batched_equals_one_by_one(model, tokenizer):
    # Left padding with a mask must not change what the model writes; the order is kept.
    prompts = ["Question: 2+2?\nAnswer: ", "Hi", "Question: what is 16 - 3 - 4?\nAnswer: ", "Q"]
    batched = generate(model, tokenizer, prompts, batch_size=3, max_new_tokens=6)
    alone = [generate(model, tokenizer, [p], batch_size=1, max_new_tokens=6)[0] for p in prompts]
    assert len(batched) == len(prompts)
    assert all(isinstance(text, str) for text in batched)
    assert batched == alone


def test_generate_respects_max_new_tokens(model, tokenizer):
    outputs = generate(
        model, tokenizer, ["Hello", "Question: 1+1?"], batch_size=2, max_new_tokens=5
    )
    # One token per byte (conftest's tokenizer), special tokens dropped: at most 5 characters.
    assert all(len(text) <= 5 for text in outputs)
    assert any(len(text) > 0 for text in outputs)


def test_generate_pads_on_the_left_and_stops_at_eos(tokenizer):
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    answer = tokenizer("#### 18", add_special_tokens=False)["input_ids"]
    garbage = tokenizer("xyz", add_special_tokens=False)["input_ids"]
    scripted = ScriptedModel(answer + [eos] + garbage)
    scripted.train()
    outputs = generate(scripted, tokenizer, ["ab", "abcd", "a"], batch_size=3, max_new_tokens=20)

    assert outputs == ["#### 18"] * 3
    call = scripted.calls[0]
    assert call["input_ids"].tolist() == [
        tokenizer("abcd")["input_ids"],  # longest first
        [pad, pad] + tokenizer("ab")["input_ids"],
        [pad, pad, pad] + tokenizer("a")["input_ids"],
    ]
    assert call["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]]
    assert call["do_sample"] is False and call["eos_token_id"] == eos
    assert scripted.training  # the caller's mode is restored


def test_generate_stops_at_the_token_limit_without_eos(tokenizer):
    scripted = ScriptedModel(tokenizer("abcdefgh", add_special_tokens=False)["input_ids"])
    assert generate(scripted, tokenizer, ["q"], batch_size=1, max_new_tokens=3) == ["abc"]


@pytest.mark.parametrize(("batch_size", "max_new_tokens"), [(0, 5), (2, 0)])
def test_generate_rejects_non_positive_sizes(model, tokenizer, batch_size, max_new_tokens):
    with pytest.raises(ValueError, match="must be >= 1"):
        generate(model, tokenizer, ["a"], batch_size=batch_size, max_new_tokens=max_new_tokens)


# --- evaluate -----------------------------------------------------------------------


def test_evaluate_report_structure(model, tokenizer):
    examples = gsm8k_examples(3)
    report = evaluate(model, tokenizer, examples, batch_size=2, max_new_tokens=8)
    summary = report["summary"]
    assert summary["dataset"] == "gsm8k"
    assert summary["n"] == 3
    assert set(MATH_METRICS) <= set(summary)
    assert len(report["examples"]) == 3
    for record, example in zip(report["examples"], examples, strict=True):
        assert set(record) == {"prompt", "prediction", "reference", "metrics"}
        assert record["prompt"] == example.prompt
        assert record["reference"] == example.reference
        assert set(record["metrics"]) == set(MATH_METRICS)
    json.dumps(report)  # the report is JSON-ready


def test_evaluate_scores_the_generated_text(tokenizer):
    # A model that writes the first reference exactly: it matches that one, not the others.
    examples = gsm8k_examples(3)
    answer = tokenizer(examples[0].reference, add_special_tokens=False)["input_ids"]
    scripted = ScriptedModel(answer + [tokenizer.eos_token_id])
    report = evaluate(scripted, tokenizer, examples, batch_size=3, max_new_tokens=64)
    assert [r["prediction"] for r in report["examples"]] == [examples[0].reference] * 3
    assert [r["metrics"]["exact_match"] for r in report["examples"]] == [1.0, 0.0, 0.0]
    assert report["summary"]["exact_match"] == pytest.approx(1 / 3)
    assert report["examples"][0]["metrics"]["step_iou"] == 1.0


def test_default_budget_leaves_room_for_the_longest_reference_answer(tokenizer):
    """A model that writes the longest reference, with a few words more, is not cut off."""
    examples = gsm8k_examples(3)
    longest = max(examples, key=lambda e: len(e.answer)).answer
    lengths = [len(tokenizer(e.answer, add_special_tokens=False)["input_ids"]) for e in examples]
    assert answer_budget(examples, tokenizer) == math.ceil(ANSWER_ROOM * (max(lengths) + 1))
    wordy = longest.replace("#### ", "So: #### ")
    eos = tokenizer.eos_token_id
    scripted = ScriptedModel(tokenizer(wordy, add_special_tokens=False)["input_ids"] + [eos])
    report = evaluate(scripted, tokenizer, examples, batch_size=3)
    assert report["max_new_tokens"] == answer_budget(examples, tokenizer)
    assert [r["prediction"] for r in report["examples"]] == [wordy] * 3
    assert report["summary"]["exact_match"] == pytest.approx(1 / 3)


def test_evaluate_uses_accuracy_for_choice_datasets(tokenizer):
    examples = [Example(f"Question {i}\nAnswer: ", k, k, "openbookqa") for i, k in enumerate("BC")]
    scripted = ScriptedModel(tokenizer("B", add_special_tokens=False)["input_ids"])
    report = evaluate(scripted, tokenizer, examples, max_new_tokens=1)
    assert report["summary"] == {"dataset": "openbookqa", "n": 2, "accuracy": 0.5}
    assert [r["metrics"] for r in report["examples"]] == [{"accuracy": 1.0}, {"accuracy": 0.0}]


def test_evaluate_rejects_empty_and_mixed_input(model, tokenizer):
    with pytest.raises(ValueError, match="no examples"):
        evaluate(model, tokenizer, [])
    mixed = [*gsm8k_examples(1), Example("Q\nAnswer: ", "A", "A", "hellaswag")]
    with pytest.raises(ValueError, match="mix datasets"):
        evaluate(model, tokenizer, mixed)


def test_format_table():
    table = format_table({"dataset": "gsm8k", "n": 3, "exact_match": 1 / 3, "step_iou": None})
    assert table.splitlines()[2:] == [
        "dataset      gsm8k",
        "n            3",
        "exact_match  0.333",
        "step_iou     n/a",
    ]


# --- qseg eval ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_llama_dir):
    """A GSM8K-layout data folder and a qseg run dir with an adapter on the tiny base model."""
    root = tmp_path_factory.mktemp("eval")
    base = tiny_llama_dir

    data = root / "data"
    data.mkdir()
    (data / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in GSM8K_ROWS))

    run = root / "run"
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), lora).save_pretrained(run)
    config = {
        "model": str(base),
        "dataset": str(data),
        "format": "steps",
        "max_length": 64,
        "quantization": "none",
        "backend": "transformers",
        "loss": {"cross_entropy": {"weight": 0.6}, "generalized_dice": {"weight": 0.4}},
    }
    (run / "run.json").write_text(json.dumps({"qseg_run": True, "config": config}))
    return {"root": root, "base": base, "data": data, "run": run}


def eval_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    return parser.parse_args(argv)


def test_run_eval_on_a_run_dir_writes_the_report(saved, tmp_path, capsys):
    output = tmp_path / "report.json"
    args = eval_args("--adapter", str(saved["run"]), "--limit", "2", "--max-new-tokens", "4")
    args.output = str(output)
    assert run_eval(args) == 0

    report = json.loads(output.read_text())
    summary = report["summary"]
    assert summary["n"] == 2
    assert {"exact_match", "step_iou", "missing_steps"} <= set(summary)
    assert len(report["examples"]) == 2
    setup = report["setup"]
    assert setup["model"] == str(saved["base"]) and setup["adapter"] == str(saved["run"])
    assert setup["dataset"] == str(saved["data"]) and setup["split"] == "test"
    assert setup["loss"]["generalized_dice"] == {"weight": 0.4}
    printed = capsys.readouterr().out
    assert "exact_match" in printed and str(output) in printed


def test_run_eval_scores_as_the_run_did(saved, tmp_path):
    """A run trained with eval_split "validation" (the HellaSwag preset) is scored on it,
    with the answer length its end-of-training evaluation used."""
    data, run = tmp_path / "data", tmp_path / "run"
    data.mkdir()
    (data / "validation.jsonl").write_text(json.dumps(GSM8K_ROWS[0]) + "\n")
    shutil.copytree(saved["run"], run)
    record = json.loads((run / "run.json").read_text())
    record["config"].update(dataset=str(data), eval_split="validation", eval_max_new_tokens=2)
    (run / "run.json").write_text(json.dumps(record))
    output = tmp_path / "report.json"
    assert run_eval(eval_args("--adapter", str(run), "--output", str(output))) == 0
    report = json.loads(output.read_text())
    assert report["setup"]["split"] == "validation" and report["summary"]["n"] == 1
    assert report["setup"]["max_new_tokens"] == 2


def test_a_run_trained_on_one_file_is_not_scored_on_it_unasked(saved, tmp_path, caplog):
    """One file has no held-out split: the run's own file is scored only when named."""
    data, run = tmp_path / "train.jsonl", tmp_path / "run"
    data.write_text(json.dumps(GSM8K_ROWS[0]) + "\n")
    shutil.copytree(saved["run"], run)
    record = json.loads((run / "run.json").read_text())
    record["config"].update(dataset=str(data))
    (run / "run.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="single file .*train.jsonl.*pass --dataset TEST_FILE"):
        run_eval(eval_args("--adapter", str(run)))
    args = eval_args("--adapter", str(run), "--dataset", str(data), "--max-new-tokens", "1")
    assert run_eval(args) == 0
    assert "the file it was trained on" in caplog.text


def test_run_eval_output_must_be_a_file(saved, tmp_path):
    args = eval_args("--model", str(saved["base"]), "--output", str(tmp_path), "--overwrite")
    with pytest.raises(ValueError, match="is a folder"):
        run_eval(args)


def test_run_eval_baseline_without_adapter(saved, tmp_path):
    output = tmp_path / "base.json"
    args = eval_args(
        *("--model", str(saved["base"]), "--dataset", str(saved["data"])),
        *("--max-new-tokens", "2", "--output", str(output)),
    )
    assert run_eval(args) == 0
    report = json.loads(output.read_text())
    assert report["summary"]["n"] == len(GSM8K_ROWS)
    assert report["setup"]["adapter"] is None


def test_run_eval_refuses_to_overwrite(saved, tmp_path):
    output = tmp_path / "report.json"
    output.write_text("keep me")
    args = eval_args("--model", str(saved["base"]), "--dataset", str(saved["data"]))
    args.output = str(output)
    with pytest.raises(ValueError, match="--overwrite"):
        run_eval(args)
    assert output.read_text() == "keep me"

    args.overwrite, args.limit, args.max_new_tokens = True, 1, 1
    assert run_eval(args) == 0
    assert json.loads(output.read_text())["summary"]["n"] == 1


def test_run_eval_rejects_a_dir_that_is_not_a_qseg_run(saved, tmp_path):
    with pytest.raises(ValueError, match="not a qseg run dir.*run.json written by qseg train"):
        run_eval(eval_args("--adapter", str(tmp_path)))
    (tmp_path / "run.json").write_text(json.dumps({"losses": [1.0]}))
    with pytest.raises(ValueError, match="not a qseg run dir.*'config'"):
        run_eval(eval_args("--adapter", str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_eval(eval_args("--adapter", str(tmp_path / "missing")))


def test_run_eval_dataset_without_the_split(saved, tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps(GSM8K_ROWS[0]) + "\n")
    args = eval_args("--model", str(saved["base"]), "--dataset", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="split 'test'"):
        run_eval(args)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared data not found at {SHARED_DATA}")
def test_run_eval_hellaswag_release_has_no_test_split(saved):
    args = eval_args("--model", str(saved["base"]), "--dataset", str(SHARED_DATA / "hellaswag"))
    with pytest.raises(FileNotFoundError, match="split 'test'"):
        run_eval(args)


@pytest.mark.parametrize("flag", ["--limit", "--batch-size", "--max-new-tokens"])
def test_run_eval_rejects_non_positive_numbers(saved, flag):
    with pytest.raises(ValueError, match=f"{flag} must be >= 1"):
        run_eval(eval_args("--model", str(saved["base"]), flag, "0"))
