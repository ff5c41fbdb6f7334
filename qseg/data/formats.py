"""Prompt and label layouts of the paper's four datasets, for raw releases and hub layouts.

Every dataset becomes ``Example(prompt, answer, reference, dataset)``: the model reads
``prompt`` and learns to write ``answer`` (then EOS). The layouts follow the paper's
``parquet_creator.py``:

- GSM8K: ``Question: {question}\\nAnswer: `` -> the ``<<...>>`` calculator steps joined by
  spaces, then ``#### {answer}`` (``fmt="full"`` keeps the whole original rationale).
- MathQA: ``Question: {Problem}\\nAnswer: `` -> the ``linear_formula`` steps as
  ``<<op(args)>>``, then ``#### {float(correct option)}``.
- OpenBookQA: ``Question: {stem}\\nA. ...\\nB. ...\\nContext: {fact1}\\nAnswer: `` -> the letter
  (no ``Context:`` line when the row has no ``fact1``, as in the Main release).
- HellaSwag: ``Question: {ctx}\\nA. ...\\nD. ...\\nAnswer: `` -> the letter.

A layout is recognised from the fields of a row (``detect_layout``); ``format_row`` then
turns one row into an ``Example``. It raises ``SkipRow`` for a row dropped on purpose
(MathQA rows whose correct option is not a number or whose formula is empty) and
``BadFieldError`` for a row that lacks what its layout needs (or holds it malformed).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from qseg.constants import FORMATS

DATASETS = ("gsm8k", "mathqa", "openbookqa", "hellaswag")


@dataclass
class Example:
    """One prompt/answer pair; ``prompt`` ends exactly where ``answer`` begins.

    ``reference`` is the text predictions are scored against: the answer with its steps and
    ``#### N`` for GSM8K and MathQA, the letter for the choice datasets.
    """

    prompt: str
    answer: str
    reference: str
    dataset: str
    # A conversation (users' chat layouts): tokenization renders it, every assistant turn
    # scored; `answer` and `reference` are then its last assistant turn, `prompt` is empty.
    messages: tuple[dict[str, str], ...] | None = None
    template: bool = True  # render `messages` with the tokenizer's chat template


class BadFieldError(ValueError):
    """A row lacks a field its layout needs, or holds a malformed one.

    The loader adds the source and the row number to the message.
    """

    def __init__(self, field: str, problem: str = "is missing") -> None:
        super().__init__(f"field '{field}' {problem}")
        self.field = field


class SkipRow(Exception):
    """A well-formed row the paper's recipe leaves out; ``str(err)`` says why, for the log."""


def format_prompt(example: Example) -> str:
    """The text a model reads before it answers; training and evaluation both use this."""
    return example.prompt


def _field(row: dict[str, Any], name: str, *, where: str = "") -> Any:
    """``row[name]``; absent, None and "" all count as missing (the hub fills gaps with "")."""
    value = row.get(name) if isinstance(row, dict) else None
    if value is None or value == "":
        raise BadFieldError(f"{where}{name}")
    return value


def _choices_prompt(question: str, labels: list[str], texts: list[str], context: str) -> str:
    lines = [f"Question: {question}"]
    lines += [f"{label}. {text}" for label, text in zip(labels, texts, strict=True)]
    if context:
        lines.append(f"Context: {context}")
    return "\n".join(lines) + "\nAnswer: "


# --- GSM8K ------------------------------------------------------------------------------

_CALC_STEP = re.compile(r"<<[^>]+>>")
_FINAL_ANSWER = re.compile(r"#### .+")


def _gsm8k(row: dict[str, Any], fmt: str) -> Example:
    question, rationale = _field(row, "question"), _field(row, "answer")
    final = _FINAL_ANSWER.findall(rationale)
    if not final:
        raise BadFieldError("answer", "has no final '#### <number>' line")
    answer = rationale if fmt == "full" else " ".join(_CALC_STEP.findall(rationale) + final[-1:])
    return Example(f"Question: {question}\nAnswer: ", answer, answer, "gsm8k")


# --- MathQA -----------------------------------------------------------------------------

# Options come as "a ) 38 , b ) 27.675 , ..." or, in some rows of the release, as a Python
# list "['a ) 4', 'b ) 4 π', ...]"; option texts may hold commas themselves ("8000 , 16000").
_OPTION_START = {
    letter: re.compile(("^" if letter == "a" else ",") + rf"\s*[\['\"]*\s*{letter}\s*\)")
    for letter in "abcde"
}
# A number with an optional unit or currency around it ("rs . 640", "57 %", "- 5", "$ 1,000").
# Fractions, ratios and times ("2 / 5", "3 : 2", "14 : 00") are not floats and are dropped.
_NUMBER = re.compile(
    r"(?P<before>[^\d+\-]*?)(?P<sign>[+-]?)\s*"
    r"(?P<digits>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)(?P<after>\D*)"
)
# Words next to the number that change its value: "4 π", "sqrt ( 2", "1 billion km", "3 ½ days".
_SCALED = re.compile(r"π|\bpi\b|√|sqrt|[½¼¾⁄/^]|\b(?:thousand|million|billion|lakh|crore)\b")
# Units written with an exponent or a slash, which would read as a second number or a
# fraction: "750 cm 2" (cm²), "1200 m ^ 2", "36 km / hr".
_UNIT_SUFFIX = re.compile(
    r"\s*(?:(?:mm|cm|km|m|ft|in|yd)\s*\^?\s*[23]|(?:km|m|miles?)\s*/\s*(?:hr|h|hour|s|sec))\s*$"
)
_MINUS_SIGNS = str.maketrans({"−": "-", "–": "-"})


def parse_options(options: str) -> dict[str, str]:
    """``"a ) 38 , b ) 27.675 , ..."`` -> ``{"a": "38", "b": "27.675", ...}`` ({} if malformed)."""
    spans, pos = [], 0
    for letter, pattern in _OPTION_START.items():
        match = pattern.search(options, pos)
        if match is None:
            return {}
        spans.append((letter, match.start(), match.end()))
        pos = match.end()
    ends = [start for _, start, _ in spans[1:]] + [len(options)]
    return {
        letter: options[begin:end].strip().strip("'\"]").strip()
        for (letter, _, begin), end in zip(spans, ends, strict=True)
    }


def parse_number(text: str) -> float | None:
    """The float an option states, ignoring units around it; None when it is not one number."""
    match = _NUMBER.fullmatch(_UNIT_SUFFIX.sub("", text.strip().translate(_MINUS_SIGNS)))
    if match is None or _SCALED.search(match["before"] + " " + match["after"]):
        return None
    return float(match["sign"] + match["digits"].replace(",", ""))


def _mathqa(row: dict[str, Any], fmt: str) -> Example:
    problem, options = _field(row, "Problem"), _field(row, "options")
    correct = _field(row, "correct")
    if "linear_formula" not in row:
        raise BadFieldError("linear_formula")
    # No annotated_formula fallback: its nested form is not the paper's target.
    steps = [f"<<{step.strip()}>>" for step in (row["linear_formula"] or "").split("|")]
    steps = [step for step in steps if step != "<<>>"]
    if not steps:
        raise SkipRow("linear_formula is empty")
    option_text = parse_options(options).get(str(correct).strip().lower())
    value = None if option_text is None else parse_number(option_text)
    if value is None:
        raise SkipRow("the correct option is not a number")
    # Python's float form, never its exponent form: "1e-05" would not read back as a number.
    answer = " ".join([*steps, f"#### {Decimal(repr(value)):f}"])
    return Example(f"Question: {problem}\nAnswer: ", answer, answer, "mathqa")


# --- OpenBookQA -------------------------------------------------------------------------


def _openbookqa(stem: str, labels: list[str], texts: list[str], row: dict[str, Any]) -> Example:
    if len(labels) != len(texts):
        raise BadFieldError("choices", f"has {len(labels)} labels for {len(texts)} texts")
    key = _field(row, "answerKey")
    if key not in labels:
        raise BadFieldError("answerKey", f"is '{key}', not one of the choice labels {labels}")
    prompt = _choices_prompt(stem, labels, texts, row.get("fact1") or "")
    return Example(prompt, key, key, "openbookqa")


def _openbookqa_raw(row: dict[str, Any], fmt: str) -> Example:
    question = _field(row, "question")
    stem, choices = (
        _field(question, "stem", where="question."),
        _field(question, "choices", where="question."),
    )
    labels = [_field(c, "label", where="question.choices[].") for c in choices]
    texts = [_field(c, "text", where="question.choices[].") for c in choices]
    return _openbookqa(stem, labels, texts, row)


def _openbookqa_hub(row: dict[str, Any], fmt: str) -> Example:
    stem, choices = _field(row, "question_stem"), _field(row, "choices")
    labels = list(_field(choices, "label", where="choices."))
    texts = list(_field(choices, "text", where="choices."))
    return _openbookqa(stem, labels, texts, row)


# --- HellaSwag --------------------------------------------------------------------------


def _hellaswag(context_field: str) -> Callable[[dict[str, Any], str], Example]:
    def format_hellaswag(row: dict[str, Any], fmt: str) -> Example:
        context, endings = _field(row, context_field), list(_field(row, "endings"))
        if row.get("label") == "":  # how the hub's test split leaves it
            raise BadFieldError("label", "is empty: HellaSwag's test split is unlabelled")
        label = str(_field(row, "label")).strip()  # an int in the release, a string on the hub
        if not label.isdigit() or int(label) >= len(endings):
            raise BadFieldError("label", f"is '{label}', not an index into the endings")
        letters = [chr(ord("A") + i) for i in range(len(endings))]
        letter = letters[int(label)]
        return Example(_choices_prompt(context, letters, endings, ""), letter, letter, "hellaswag")

    return format_hellaswag


# --- layouts ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """How to recognise a row (``signature`` keys all present) and turn it into an Example."""

    name: str
    dataset: str
    signature: tuple[str, ...]
    fields: str  # what the layout needs, for error messages
    format: Callable[[dict[str, Any], str], Example]

    def matches(self, row: dict[str, Any]) -> bool:
        if not all(key in row for key in self.signature):
            return False
        # GSM8K and the raw OpenBookQA both have "question": a string in one, a dict in the other.
        if "question" in self.signature:
            return isinstance(row["question"], dict) == (self.dataset == "openbookqa")
        return True


LAYOUTS = (
    Layout("gsm8k", "gsm8k", ("question", "answer"), "question, answer", _gsm8k),
    Layout(
        "mathqa",
        "mathqa",
        ("Problem", "options"),
        "Problem, options, correct, linear_formula",
        _mathqa,
    ),
    Layout(
        "openbookqa",
        "openbookqa",
        ("question", "answerKey"),
        "question{stem, choices[{text, label}]}, answerKey, optional fact1",
        _openbookqa_raw,
    ),
    Layout(
        "openbookqa-hub",
        "openbookqa",
        ("question_stem",),
        "question_stem, choices{text, label}, answerKey, optional fact1",
        _openbookqa_hub,
    ),
    Layout("hellaswag", "hellaswag", ("ctx", "endings"), "ctx, endings, label", _hellaswag("ctx")),
    Layout(
        "hellaswag-sample",
        "hellaswag",
        ("context", "endings"),
        "context, endings, label",
        _hellaswag("context"),
    ),
)


def known_layouts() -> str:
    """``"gsm8k (question, answer); mathqa (...); ..."`` for error messages."""
    return "; ".join(f"{layout.name} ({layout.fields})" for layout in LAYOUTS)


def detect_layout(row: Any) -> Layout | None:
    """The layout whose signature fields ``row`` has, or None."""
    if not isinstance(row, dict):
        return None
    return next((layout for layout in LAYOUTS if layout.matches(row)), None)


def format_row(row: dict[str, Any], layout: Layout, fmt: str = "steps") -> Example:
    """One row -> Example; raises SkipRow (dropped on purpose) or BadFieldError (malformed)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format '{fmt}'; choose one of {', '.join(FORMATS)}")
    if fmt == "full" and layout.dataset != "gsm8k":
        raise ValueError(f"format 'full' applies to gsm8k only, not {layout.dataset}")
    return layout.format(row, fmt)
