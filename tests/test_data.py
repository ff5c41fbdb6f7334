"""qseg.data: the paper's prompt layouts on real rows, hub layouts, sources, tokenization."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from qseg.data import (
    IGNORE_INDEX,
    DataCollator,
    Example,
    build_dataset,
    encode_prompt,
    format_prompt,
    load_examples,
    tokenize_example,
)
from qseg.data.formats import SkipRow, detect_layout, format_row, parse_number, parse_options
from qseg.data.sources import SAMPLE_DIR
from qseg.metrics import score_math

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"the shared real data folder {SHARED} is absent"
)


def read_rows(path: Path) -> list[dict]:
    if path.suffix == ".json":
        return json.loads(path.read_text(encoding="utf-8"))
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def formatted(row: dict, fmt: str = "steps") -> Example | None:
    """The row's Example, or None where the recipe drops the row."""
    try:
        return format_row(row, detect_layout(row), fmt)
    except SkipRow:
        return None


# --- real rows of the four datasets -----------------------------------------------------

NATALIA = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
    "in May. How many clips did Natalia sell altogether in April and May?"
)


@needs_shared
def test_gsm8k_real_row_steps_and_full_rationale():
    path = SHARED / "gsm8k" / "train.jsonl"
    [steps] = load_examples(str(path), limit=1)
    assert steps == Example(
        prompt=f"Question: {NATALIA}\nAnswer: ",
        answer="<<48/2=24>> <<48+24=72>> #### 72",
        reference="<<48/2=24>> <<48+24=72>> #### 72",
        dataset="gsm8k",
    )
    [full] = load_examples(str(path), fmt="full", limit=1)
    rationale = (
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
        "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
    )
    assert (full.prompt, full.answer, full.reference) == (steps.prompt, rationale, rationale)
    assert format_prompt(full) == full.prompt


@needs_shared
def test_gsm8k_folder_picks_the_split_file():
    examples = load_examples(str(SHARED / "gsm8k"), "test")
    assert len(examples) == 1319
    assert examples[0].answer == "<<16-3-4=9>> <<9*2=18>> #### 18"


@needs_shared
def test_mathqa_real_rows():
    rows = read_rows(SHARED / "mathqa" / "dev.json")
    first = formatted(rows[0])
    assert first.prompt == (
        "Question: a multiple choice test consists of 4 questions , and each question has 5 "
        "answer choices . in how many r ways can the test be completed if every question is "
        "unanswered ?\nAnswer: "
    )
    assert first.answer == first.reference == "<<power(n1,n0)>> #### 625.0"
    # Row 6: no trailing "|", so the last step is a real one and must be kept.
    assert formatted(rows[5]).answer == (
        "<<add(n1,n2)>> <<add(n3,#0)>> <<subtract(const_100,#1)>> <<multiply(n0,#2)>> "
        "<<divide(#3,const_100)>> #### 117.0"
    )
    assert formatted(rows[9]).answer.endswith("<<multiply(#1,#2)>> #### -25.0")  # "d ) - 25"
    # Row 52 stores its options as a Python list: "['a ) 13 1 / 2', 'b ) 20', ...]".
    assert formatted(rows[51]).answer == "<<rectangle_area(n0,n1)>> <<divide(#0,n2)>> #### 20.0"
    for index in (1, 40):  # correct options "31 / 36" (not a float) and "4 π" (times pi)
        with pytest.raises(SkipRow, match="the correct option is not a number"):
            format_row(rows[index], detect_layout(rows[index]))


def test_mathqa_option_parsing():
    options = "a ) 38 , b ) 27.675 , c ) 8000 , 16000 , d ) data inadequate , e ) none of these"
    assert parse_options(options) == {
        "a": "38",
        "b": "27.675",
        "c": "8000 , 16000",
        "d": "data inadequate",
        "e": "none of these",
    }
    assert parse_options("a ) 1 , b ) 2") == {}
    cases = {"rs . 1,517.25": 1517.25, "57 %": 57.0, "- 5": -5.0, "− 2": -2.0, ".5": 0.5}
    # Areas, volumes and speeds: "cm 2" is cm², not a second number.
    cases |= {"288 cm 2": 288.0, "1200 m ^ 2": 1200.0, "7500 m 3": 7500.0, "36 km / hr": 36.0}
    for text, value in cases.items():
        assert parse_number(text) == value, text
    for text in ["2 / 5", "3 : 2", "8000 , 16000", "4 π", "1 billion km", "none", "3 x 2", "5 ^ 2"]:
        assert parse_number(text) is None, text


def test_mathqa_answers_are_never_in_exponent_form():
    row = {
        "Problem": "p",
        "Rationale": "r",
        "options": "a ) 0.00001 , b ) 2 , c ) 3 , d ) 4 , e ) 1e16",
        "correct": "a",
        "linear_formula": "divide(n0,n1)|",
    }
    for correct, answer in (("a", "0.00001"), ("b", "2.0")):
        example = format_row({**row, "correct": correct}, detect_layout(row))
        assert example.answer == f"<<divide(n0,n1)>> #### {answer}"
        assert score_math([example.answer], [example.reference])["exact_match"] == 1.0


@needs_shared
def test_mathqa_drops_non_numeric_answers_and_logs_the_count(caplog):
    with caplog.at_level(logging.INFO, logger="qseg.data"):
        examples = load_examples(str(SHARED / "mathqa"), "validation")
    assert len(examples) == 4475 - 542
    assert "dropped 542 rows" in caplog.text and "not a number" in caplog.text
    for example in examples:
        float(example.answer.split(" #### ")[-1])  # every answer ends with a float


OBQA_CHOICES = (
    "A. puppies learning new tricks\nB. children growing up and getting old\n"
    "C. flowers wilting in a vase\nD. plants sprouting, blooming and wilting\n"
)


@needs_shared
def test_openbookqa_real_rows_with_and_without_fact():
    [additional] = load_examples(str(SHARED / "openbookqa" / "Additional"), "train", limit=1)
    fact = "Context: the sun is the source of energy for physical cycles on Earth\n"
    assert additional == Example(
        prompt=f"Question: The sun is responsible for\n{OBQA_CHOICES}{fact}Answer: ",
        answer="D",
        reference="D",
        dataset="openbookqa",
    )
    [main] = load_examples(str(SHARED / "openbookqa" / "Main" / "train.jsonl"), limit=1)
    assert main.prompt == "Question: The sun is responsible for\n" + OBQA_CHOICES + "Answer: "
    assert main.answer == "D"


@needs_shared
def test_hellaswag_real_row():
    [example] = load_examples(str(SHARED / "hellaswag"), "validation", limit=1)
    assert example.prompt == (
        "Question: [header] How to recover from an emotional affair [title] Forgive yourself. "
        "[step] While forgiving others can be challenging, it's often even harder to forgive "
        "yourself. Remember that if you had known the path of your actions and their "
        "consequences, you probably would not have done what you did.\n"
        "A. Take some time to live in the past and let go of those emotions. For example, if "
        "you had experienced a miscarriage, forgiveness would be easy.\n"
        "B. Forgiveness in someone else can only serve to make it harder. [substeps] Cheating "
        "can be very emotional, and can even be worse.\n"
        "C. To begin forgiving yourself, admit that you messed up or made a mistake. Making "
        "mistakes is part of being human and no one is exempt from it.\n"
        "D. In the moment, forgive yourself for all the things you could have done "
        "differently. [substeps] Though you may have felt wronged, forgiving yourself for your "
        "actions will take time and effort to live.\nAnswer: "
    )
    assert (example.answer, example.reference, example.dataset) == ("C", "C", "hellaswag")


# --- hub layouts ------------------------------------------------------------------------


def to_hub_openbookqa(row: dict) -> dict:
    choices = row["question"]["choices"]
    return {
        "id": row["id"],
        "question_stem": row["question"]["stem"],
        "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
        "answerKey": row["answerKey"],
        "fact1": row["fact1"],
        "humanScore": 1.0,
        "clarity": 2.0,
        "turkIdAnonymized": row["turkIdAnonymized"],
    }


def to_hub_hellaswag(row: dict) -> dict:
    return {
        "ind": 1,
        "activity_label": row["activity_label"],
        "ctx_a": "",
        "ctx_b": "",
        "ctx": row["context"],
        "endings": row["endings"],
        "source_id": row["source_id"],
        "split": "val",
        "split_type": "indomain",
        "label": str(row["label"]),
    }


@needs_shared
@pytest.mark.parametrize(
    ("raw_file", "to_hub"),
    [
        ("openbookqa/Additional/train_complete.jsonl", to_hub_openbookqa),
        ("hellaswag/hellaswag_val_500_en.jsonl", to_hub_hellaswag),
        ("mathqa/dev.json", dict),  # the hub's math_qa has the release's fields
        ("gsm8k/train.jsonl", dict),
    ],
)
def test_hub_layout_rows_format_like_raw_rows(tmp_path, raw_file, to_hub):
    pa = pytest.importorskip("pyarrow", reason="parquet files need pyarrow (comes with datasets)")
    import pyarrow.parquet as pq

    raw_path = SHARED / raw_file
    raw_rows = read_rows(raw_path)[:20]
    hub_path = tmp_path / "hub.parquet"  # the hub stores parquet; nested fields survive
    pq.write_table(pa.Table.from_pylist([to_hub(row) for row in raw_rows]), hub_path)
    raw = [formatted(row) for row in raw_rows]
    assert load_examples(str(hub_path)) == [example for example in raw if example is not None]


def test_mathqa_empty_formula_is_dropped_and_a_missing_one_is_an_error(tmp_path, caplog):
    row = {"Problem": "p", "options": "a ) 1 , b ) 2 , c ) 3 , d ) 4 , e ) 5", "correct": "b"}
    rows = [{**row, "linear_formula": "add(n0,n1)|"}, {**row, "linear_formula": "|"}]
    with caplog.at_level(logging.WARNING, logger="qseg.data"):
        [example] = load_examples(str(write_jsonl(tmp_path / "m.jsonl", rows)))
    assert example.answer == "<<add(n0,n1)>> #### 2.0"
    assert "dropped 1 rows" in caplog.text and "linear_formula is empty" in caplog.text
    with pytest.raises(ValueError, match="row 2: field 'linear_formula' is missing"):
        load_examples(str(write_jsonl(tmp_path / "m2.jsonl", [rows[0], row])))


def test_hub_mathqa_options_string_is_read():
    row = {
        "Problem": "what is 38 ?",
        "Rationale": "",
        "options": "a ) 38 , b ) 27.675 , c ) 30 , d ) data inadequate , e ) none of these",
        "correct": "a",
        "annotated_formula": "add(n0, const_0)",
        "linear_formula": "add(n0,const_0)|",
        "category": "general",
    }
    assert formatted(row).answer == "<<add(n0,const_0)>> #### 38.0"


def test_hub_dataset_names_go_through_datasets(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return [{"question": "1+1?", "answer": "<<1+1=2>>2\n#### 2"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    [example] = load_examples("gsm8k", "dev")
    assert example.answer == "<<1+1=2>> #### 2"
    assert calls == [("openai/gsm8k", "main", "validation")]


def test_hub_datasets_with_a_loading_script_are_read_from_their_parquet_branch(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []
    row = {
        "Problem": "p",
        "Rationale": "r",
        "options": "a ) 1 , b ) 2 , c ) 3 , d ) 4 , e ) 5",
        "correct": "b",
        "linear_formula": "add(n0,n1)|",
    }

    def scripts_refused(path, name=None, split=None, revision=None):
        calls.append((path, revision))
        if revision is None:  # what datasets >= 4 raises for a dataset with a script
            raise RuntimeError("Dataset scripts are no longer supported, but found math_qa.py")
        return [row]

    monkeypatch.setattr(datasets, "load_dataset", scripts_refused)
    [example] = load_examples("mathqa", "test")
    assert example.answer == "<<add(n0,n1)>> #### 2.0"
    assert calls == [("allenai/math_qa", None), ("allenai/math_qa", "refs/convert/parquet")]


def test_unreachable_hub_says_to_pass_a_local_source(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def offline(path, name=None, split=None):
        calls.append((path, name, split))
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match="could not be reached.*gsm8k-sample"):
        load_examples("openbookqa", "train")
    with pytest.raises(ValueError, match="Rowan/hellaswag"):
        load_examples("hellaswag", "validation")
    assert calls == [
        ("allenai/openbookqa", "additional", "train"),
        ("Rowan/hellaswag", None, "validation"),
    ]


def test_importing_qseg_data_does_not_import_datasets():
    code = "import sys, qseg.data; assert 'datasets' not in sys.modules, 'datasets imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- sources and errors -----------------------------------------------------------------


def test_shipped_gsm8k_sample_loads():
    train, test = load_examples("gsm8k-sample", "train"), load_examples("gsm8k-sample", "test")
    assert (len(train), len(test)) == (200, 50)
    assert train[0].prompt == f"Question: {NATALIA}\nAnswer: "
    assert all(example.answer.startswith(("<<", "####")) for example in train + test)
    assert "MIT License" in (SAMPLE_DIR / "LICENSE").read_text()
    assert "openai/grade-school-math" in (SAMPLE_DIR / "SOURCE.md").read_text()
    assert sum(path.stat().st_size for path in SAMPLE_DIR.iterdir()) < 200_000
    with pytest.raises(ValueError, match="splits train and test"):
        load_examples("gsm8k-sample", "validation")


@needs_shared
def test_shipped_sample_rows_are_the_first_rows_of_the_release():
    for split, n in (("train", 200), ("test", 50)):
        release = (SHARED / "gsm8k" / f"{split}.jsonl").read_text().splitlines(keepends=True)
        assert (SAMPLE_DIR / f"{split}.jsonl").read_text() == "".join(release[:n])


def test_missing_field_names_file_row_and_field(tmp_path):
    rows = [{"question": "q1", "answer": "<<1+1=2>> #### 2"}] * 2 + [{"question": "q3"}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=r"bad\.jsonl: row 3: field 'answer' is missing"):
        load_examples(str(path))
    assert len(load_examples(str(path), limit=2)) == 2  # rows past the limit are not read

    no_final = write_jsonl(tmp_path / "no_final.jsonl", [{"question": "q", "answer": "2"}])
    with pytest.raises(ValueError, match="row 1: field 'answer' has no final '####"):
        load_examples(str(no_final))


def test_missing_nested_and_empty_fields(tmp_path):
    choices = [{"text": "a", "label": "A"}, {"text": "b", "label": "B"}]
    obqa = [
        {"question": {"stem": "s", "choices": choices}, "answerKey": "A"},
        {"question": {"choices": choices}, "answerKey": "B"},
    ]
    with pytest.raises(ValueError, match="row 2: field 'question.stem' is missing"):
        load_examples(str(write_jsonl(tmp_path / "obqa.jsonl", obqa)))
    # The hub's HellaSwag test split is unlabeled: label "".
    swag = [{"ctx": "c", "endings": ["x", "y"], "label": ""}]
    with pytest.raises(ValueError, match="row 1: field 'label' is empty: HellaSwag's test split"):
        load_examples(str(write_jsonl(tmp_path / "swag.jsonl", swag)))


def test_unknown_layout_lists_known_layouts(tmp_path):
    path = write_jsonl(tmp_path / "other.jsonl", [{"body": "hello", "target": "world"}])
    with pytest.raises(ValueError, match="unknown data layout") as info:
        load_examples(str(path))
    message = str(info.value)
    assert "['body', 'target']" in message
    for layout in ("gsm8k (question, answer)", "question_stem", "hellaswag (ctx, endings"):
        assert layout in message


def test_bad_sources_and_options(tmp_path):
    with pytest.raises(FileNotFoundError, match="gsm8k-sample"):
        load_examples(str(tmp_path / "nowhere.jsonl"))
    with pytest.raises(FileNotFoundError, match="neither a local file"):
        load_examples("missing/train.jsonl")  # a relative path, not a hub id
    mathqa = write_jsonl(tmp_path / "m.jsonl", [{"Problem": "p", "options": "o"}])
    with pytest.raises(ValueError, match="format 'full' applies to gsm8k only"):
        load_examples(str(mathqa), fmt="full")
    with pytest.raises(ValueError, match="unknown format 'cot'"):
        load_examples("gsm8k-sample", fmt="cot")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_examples(str(tmp_path / "data.csv"))


@needs_shared
def test_folder_split_errors_name_the_files():
    with pytest.raises(FileNotFoundError, match="split 'train'.*dev.json, test.json"):
        load_examples(str(SHARED / "mathqa"), "train")
    with pytest.raises(ValueError, match="Additional/train_complete.jsonl, Main/train.jsonl"):
        load_examples(str(SHARED / "openbookqa"), "train")


# --- tokenization -----------------------------------------------------------------------


def make_tokenizer(add_bos: bool) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained in memory: offline, and every byte round-trips."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([f"Question: {NATALIA}\nAnswer: <<48/2=24>> #### 72"], trainer)
    if add_bos:  # Llama-style: "<s>" in front of every encoded text
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


@pytest.fixture(scope="module", params=[True, False], ids=["bos", "no-bos"])
def tiny_tokenizer(request) -> PreTrainedTokenizerFast:
    return make_tokenizer(add_bos=request.param)


EXAMPLE = Example(
    prompt=f"Question: {NATALIA}\nAnswer: ",
    answer="<<48/2=24>> <<48+24=72>> #### 72",
    reference="<<48/2=24>> <<48+24=72>> #### 72",
    dataset="gsm8k",
)


def bos_ids(tokenizer) -> list[int]:
    return (
        [tokenizer.bos_token_id] if tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id else []
    )


def test_answer_span_is_exact_and_ends_with_a_learned_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    feature = tokenize_example(EXAMPLE, tok, max_length=512)
    ids, labels = feature["input_ids"], feature["labels"]
    assert len(ids) == len(labels) == len(feature["attention_mask"]) and all(
        feature["attention_mask"]
    )
    answer_at = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    assert all(label == IGNORE_INDEX for label in labels[:answer_at])
    assert labels[answer_at:] == ids[answer_at:]  # labels are not shifted
    assert ids[-1] == labels[-1] == tok.eos_token_id
    assert tok.decode(ids[answer_at:-1]) == EXAMPLE.answer
    assert ids[:answer_at] == encode_prompt(EXAMPLE, tok)
    bos = bos_ids(tok)
    assert ids[: len(bos)] == bos and tok.decode(ids[len(bos) : answer_at]) == EXAMPLE.prompt


def test_long_prompt_is_cut_from_the_left(tiny_tokenizer):
    tok = tiny_tokenizer
    full = tokenize_example(EXAMPLE, tok, max_length=512)
    n_answer = sum(label != IGNORE_INDEX for label in full["labels"])
    bos = bos_ids(tok)
    max_length = len(bos) + 5 + n_answer
    cut = tokenize_example(EXAMPLE, tok, max_length=max_length)
    assert len(cut["input_ids"]) == max_length
    assert cut["input_ids"][: len(bos)] == bos  # BOS stays first
    assert cut["input_ids"][len(bos) : len(bos) + 5] == full["input_ids"][-n_answer - 5 : -n_answer]
    assert cut["labels"][-n_answer:] == full["labels"][-n_answer:]  # every answer token kept
    assert encode_prompt(EXAMPLE, tok, max_length=len(bos) + 5) == cut["input_ids"][:-n_answer]


def test_answer_too_long_is_dropped_and_counted(tiny_tokenizer, caplog):
    tok = tiny_tokenizer
    n_answer = sum(label != IGNORE_INDEX for label in tokenize_example(EXAMPLE, tok, 512)["labels"])
    just_fits = len(bos_ids(tok)) + n_answer
    only_answer = tokenize_example(EXAMPLE, tok, max_length=just_fits)
    assert (
        only_answer["labels"][len(bos_ids(tok)) :] == only_answer["input_ids"][len(bos_ids(tok)) :]
    )
    assert tokenize_example(EXAMPLE, tok, max_length=just_fits - 1) is None
    short = Example("Question: 2?\nAnswer: ", "#### 2", "#### 2", "gsm8k")
    with caplog.at_level(logging.WARNING, logger="qseg.data"):
        features, dropped = build_dataset([EXAMPLE, short, EXAMPLE], tok, max_length=just_fits - 1)
    assert dropped == 2 and len(features) == 1
    assert features[0] == tokenize_example(short, tok, max_length=just_fits - 1)
    assert "dropped 2 of 3 examples" in caplog.text


def test_tokenizer_without_eos_is_refused():
    tok = make_tokenizer(add_bos=False)
    tok.eos_token = None
    with pytest.raises(ValueError, match="eos_token"):
        tokenize_example(EXAMPLE, tok, max_length=64)


def test_collator_pads_right_by_default_and_left_on_request():
    features = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
        {"input_ids": [8], "attention_mask": [1], "labels": [8]},
    ]
    right = DataCollator(pad_token_id=0)(features)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(tensor.dtype == torch.long for tensor in right.values())
    prompts = [
        {"input_ids": [5, 6], "attention_mask": [1, 1]},
        {"input_ids": [8], "attention_mask": [1]},
    ]
    left = DataCollator(pad_token_id=2, padding_side="left")(prompts)
    assert set(left) == {"input_ids", "attention_mask"}
    assert left["input_ids"].tolist() == [[5, 6], [2, 8]]
    assert left["attention_mask"].tolist() == [[1, 1], [0, 1]]
    with pytest.raises(ValueError, match="padding_side must be one of right, left"):
        DataCollator(padding_side="middle")


def test_sample_end_to_end_batch(tiny_tokenizer):
    features, dropped = build_dataset(load_examples("gsm8k-sample", limit=4), tiny_tokenizer, 256)
    batch = DataCollator(tiny_tokenizer.pad_token_id)(features)
    assert dropped == 0 and batch["input_ids"].shape == batch["labels"].shape
    assert batch["input_ids"].shape[0] == 4
    # Each row learns exactly its answer and one EOS.
    assert ((batch["labels"] == tiny_tokenizer.eos_token_id).sum(dim=1) == 1).all()
