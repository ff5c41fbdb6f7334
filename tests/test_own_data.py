"""Users' own data: every layout trains with `qseg train`, conversations score exactly their
assistant turns, `qseg eval` scores free text, and bad rows or flags fail before the model
loads."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import make_byte_tokenizer
from transformers import AutoTokenizer

import qseg.eval
import qseg.training.recipe
from qseg.cli import main
from qseg.data import build_dataset, load_examples
from qseg.models import default_model_source, load_tokenizer
from qseg.text_metrics import compile_answer_pattern, score_text

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SUPPORT_CHAT = [
    {"role": "system", "content": "You answer billing questions."},
    {"role": "user", "content": "Why was I charged twice?"},
    {"role": "assistant", "content": "One charge is a hold; it drops in 3 days."},
    {"role": "user", "content": "Can you refund it now?"},
    {"role": "assistant", "content": "Done: refund #4411 issued."},
]
ROWS = {
    "prompt-completion": [
        {"prompt": "Extract the city: I live in Lyon.\n", "completion": "Lyon"},
        {"prompt": "Extract the city: Flights to Oslo.\n", "completion": "Oslo"},
    ],
    "conversational": [
        {
            "prompt": [{"role": "user", "content": "Capital of Peru?"}],
            "completion": [{"role": "assistant", "content": "Lima"}],
        }
    ]
    * 2,
    "messages": [{"messages": SUPPORT_CHAT}] * 2,
    "alpaca": [
        {"instruction": "Translate to French.", "input": "good morning", "output": "bonjour"},
        {"instruction": "Name a primary colour.", "input": "", "output": "red"},
    ],
    "text": [{"text": "The warranty covers parts for two years."}] * 2,
    "fields": [
        {"question": "2 + 2?", "reply": "4", "id": 1},
        {"question": "3 + 4?", "reply": "7", "id": 2},
    ],
}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def chat_llama_dir(tiny_llama_dir: Path, tmp_path_factory) -> Path:
    """The tiny Llama whose tokenizer carries a ChatML template."""
    folder = tmp_path_factory.mktemp("chat-llama")
    shutil.copytree(tiny_llama_dir, folder, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(folder)
    return folder


def train(argv: list[str]) -> int:
    return main(["train", "--max-steps", "2", "--batch-size", "2", "--eval-samples", "0", *argv])


@pytest.mark.parametrize("layout", list(ROWS))
def test_train_on_each_layout(layout, chat_llama_dir, tmp_path):
    data = write_jsonl(tmp_path / f"{layout}.jsonl", ROWS[layout])
    out = tmp_path / "run"
    argv = ["--model", str(chat_llama_dir), "--dataset", str(data), "--output-dir", str(out)]
    if layout == "fields":
        argv += ["--fields", "prompt=question,completion=reply"]
    assert train(argv) == 0
    assert (out / "adapter_model.safetensors").is_file()
    record = json.loads((out / "run.json").read_text())
    expected = "prompt-completion" if layout == "fields" else layout
    assert record["data"]["layout"] == expected
    conversational = layout in ("messages", "conversational")
    assert record["data"]["chat_template"] == ("template" if conversational else "none")
    assert record["data"]["train_examples"] == 2


@pytest.mark.parametrize("as_layout", ["prompt-completion", "messages"])
def test_real_gsm8k_rows_in_users_layouts(as_layout, chat_llama_dir, tmp_path):
    if not GSM8K.is_file():
        pytest.skip(f"{GSM8K} is not here")
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()[:6]]
    if as_layout == "prompt-completion":
        converted = [{"prompt": r["question"] + "\n", "completion": r["answer"]} for r in rows]
    else:
        converted = [
            {"messages": [
                {"role": "user", "content": r["question"]},
                {"role": "assistant", "content": r["answer"]},
            ]}
            for r in rows
        ]  # fmt: skip
    data = write_jsonl(tmp_path / "gsm8k.jsonl", converted)
    out = tmp_path / "run"
    argv = ["--model", str(chat_llama_dir), "--dataset", str(data), "--output-dir", str(out)]
    assert train([*argv, "--max-length", "512"]) == 0
    assert (out / "adapter_model.safetensors").is_file()


def scored_text(feature: dict, tokenizer) -> str:
    ids = [
        i for i, label in zip(feature["input_ids"], feature["labels"], strict=True) if label >= 0
    ]
    return tokenizer.decode(ids)


def test_a_multi_turn_conversation_scores_exactly_its_assistant_turns(tmp_path):
    tokenizer = make_byte_tokenizer()
    tokenizer.chat_template = CHATML
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": SUPPORT_CHAT}])
    features, dropped = build_dataset(load_examples(str(data)), tokenizer, max_length=512)
    assert dropped == 0
    (feature,) = features
    # Each assistant turn with its end-of-turn marker, nothing of the system or user turns.
    assert scored_text(feature, tokenizer) == (
        "One charge is a hold; it drops in 3 days.<|im_end|>\n"
        "Done: refund #4411 issued.<|im_end|>\n"
    )
    whole = tokenizer.decode(feature["input_ids"])
    assert whole == tokenizer.apply_chat_template(SUPPORT_CHAT, tokenize=False)
    # Too long: the context loses tokens from the left, never an answer token.
    first_answer = next(i for i, label in enumerate(feature["labels"]) if label >= 0)
    room = len(feature["input_ids"]) - first_answer
    (short,), _ = build_dataset(load_examples(str(data)), tokenizer, max_length=room)
    assert len(short["input_ids"]) == room
    assert scored_text(short, tokenizer) == scored_text(feature, tokenizer)
    _, dropped = build_dataset(load_examples(str(data)), tokenizer, max_length=room - 1)
    assert dropped == 1


def test_never_renders_conversations_as_plain_lines(tmp_path):
    tokenizer = make_byte_tokenizer()  # no template: never needs none
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": SUPPORT_CHAT[1:3]}])
    examples = load_examples(str(data), chat_template="never")
    (feature,), _ = build_dataset(examples, tokenizer, max_length=512)
    assert tokenizer.decode(feature["input_ids"]).startswith(
        "user: Why was I charged twice?\nassistant: One charge"
    )
    assert scored_text(feature, tokenizer) == "One charge is a hold; it drops in 3 days.\n</s>"


def test_always_wraps_plain_rows_as_a_conversation(tmp_path):
    tokenizer = make_byte_tokenizer()
    tokenizer.chat_template = CHATML
    data = write_jsonl(tmp_path / "pc.jsonl", ROWS["prompt-completion"][:1])
    (feature,), _ = build_dataset(load_examples(str(data), chat_template="always"), tokenizer, 512)
    assert tokenizer.decode(feature["input_ids"]).startswith("<|im_start|>user\nExtract the city")
    assert scored_text(feature, tokenizer) == "Lyon<|im_end|>\n"


@pytest.mark.slow
def test_smollm2_renders_messages_through_its_template(tmp_path):
    try:
        source = default_model_source()
    except FileNotFoundError as missing:
        pytest.skip(str(missing))
    tokenizer = load_tokenizer(source)
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": SUPPORT_CHAT}])
    (feature,), _ = build_dataset(load_examples(str(data)), tokenizer, max_length=512)
    assert tokenizer.decode(feature["input_ids"]) == tokenizer.apply_chat_template(
        SUPPORT_CHAT, tokenize=False
    )
    scored = scored_text(feature, tokenizer)
    assert "refund #4411 issued.<|im_end|>" in scored and "billing" not in scored
    assert "charged twice" not in scored
    out = tmp_path / "run"
    assert train(["--dataset", str(data), "--output-dir", str(out)]) == 0
    assert (out / "adapter_model.safetensors").is_file()


def test_eval_on_a_prompt_completion_file_scores_free_text(chat_llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "test.jsonl", ROWS["prompt-completion"] * 2)
    report = tmp_path / "report.json"
    argv = ["eval", "--model", str(chat_llama_dir), "--dataset", str(data), "--limit", "3"]
    assert main([*argv, "--max-new-tokens", "4", "--output", str(report)]) == 0
    summary = json.loads(report.read_text())["summary"]
    assert summary["dataset"] == "prompt-completion" and summary["n"] == 3
    assert 0.0 <= summary["exact_match"] <= summary["f1"] <= 1.0


def test_free_text_scores_and_the_answer_pattern():
    predictions = ["The answer is 1,000.", "the Eiffel Tower", "answer is blue", "no idea"]
    references = ["1000.0", "Eiffel Tower", "Answer is red", "answer is 42"]
    plain = score_text(predictions, references)
    assert plain["n"] == 4 and plain["exact_match"] == 0.25  # only the article differs
    assert 0.25 < plain["f1"] < 1.0
    pattern = compile_answer_pattern(r"[Aa]nswer is ([\w,.]+?)\.?$", references[2:])
    reduced = score_text(
        ["The answer is 1,000.", "answer is blue"], ["answer is 1000.0", "answer is blue"], pattern
    )
    assert reduced["exact_match"] == 1.0  # 1,000 and 1000.0 compare as numbers
    with pytest.raises(ValueError, match="has no group"):
        compile_answer_pattern(r"answer is \w+", references)
    with pytest.raises(ValueError, match="matches none of the 4 references"):
        compile_answer_pattern(r"#### (\S+)", references)
    with pytest.raises(ValueError, match="not a valid regex"):
        compile_answer_pattern(r"(unclosed", references)


@pytest.fixture
def no_model_loading(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(qseg.training.recipe, "load_model", forbidden)
    monkeypatch.setattr(qseg.models, "load_model", forbidden)


@pytest.mark.parametrize(
    ("rows", "extra", "message"),
    [
        ([{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}],
         [], "row 1: field 'messages' turn 2 has role 'bot'; allowed roles: system, user, "
             "assistant"),
        ([{"messages": [{"role": "user", "content": "hi"}]}], [], "row 1: .* no assistant turn"),
        ([{"prompt": "p", "completion": "ok"}, {"prompt": "p", "completion": "  "}], [],
         "row 2: field 'completion' is empty"),
        ([{"question": "q", "reply": "r"}], ["--fields", "prompt=question,completion=answer"],
         "--fields names 'answer', which row 1 does not have"),
        ([{"prompt": "p", "completion": "c"}], ["--chat-template", "always"],
         "has no chat template; use a model that has one .*SmolLM2-135M-Instruct"),
    ],
)  # fmt: skip
def test_bad_rows_and_flags_fail_before_the_model_loads(
    rows, extra, message, tiny_llama_dir, no_model_loading, tmp_path, capsys
):
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    argv = [
        "--model",
        str(tiny_llama_dir),
        "--dataset",
        str(data),
        "--output-dir",
        str(tmp_path / "o"),
    ]
    assert train([*argv, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert re.search(message, err), err


def test_eval_refuses_a_bad_answer_pattern_before_the_model_loads(
    tiny_llama_dir, tmp_path, monkeypatch, capsys
):
    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(qseg.models, "load_model", forbidden)
    data = write_jsonl(tmp_path / "test.jsonl", ROWS["prompt-completion"])
    argv = ["eval", "--model", str(tiny_llama_dir), "--dataset", str(data)]
    assert main([*argv, "--answer-pattern", "answer"]) == 2
    assert "has no group" in capsys.readouterr().err
