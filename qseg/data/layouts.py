"""Users' own data: the row layouts TRL, unsloth and torchtune read, beside the paper's four.

Recognised from the first row, in this order after the paper's layouts:

- ``messages``: ``{"messages": [{"role", "content"}, ...]}``, a conversation; every
  assistant turn is an answer span, the rest is context.
- ``conversational``: ``{"prompt": [messages], "completion": [messages]}``.
- ``prompt-completion``: ``{"prompt": str, "completion": str}``.
- ``alpaca``: ``{"instruction", "input" (optional or ""), "output"}``.
- ``text``: ``{"text": str}``, plain language modelling: every token is scored.

``--fields prompt=question,completion=reply`` maps a user's own field names onto
``prompt``/``completion`` (or any of the names above) before the layout is recognised.
Conversations become ``Example``s with ``messages`` set; ``qseg.data.chat`` renders them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qseg.data.chat import ROLES, as_turns, check_messages
from qseg.data.formats import LAYOUTS, BadFieldError, Example, Layout

# What `--chat-template` may say: render conversational rows with the tokenizer's template
# ("auto"), also wrap plain prompt/completion rows as one user and one assistant turn
# ("always"), or render every conversation as plain "role: content" lines ("never").
CHAT_TEMPLATE_MODES = ("auto", "always", "never")
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n{input}### Response:\n"


def _text_field(row: dict[str, Any], name: str) -> str:
    value = row.get(name)
    if not isinstance(value, str):
        raise BadFieldError(name, "is missing or not a string")
    if not value.strip():
        raise BadFieldError(name, "is empty")
    return value


def _example(prompt: str, answer: str, layout: str) -> Example:
    return Example(prompt, answer, answer, layout)


def _prompt_completion(row: dict[str, Any], fmt: str) -> Example:
    return _example(_text_field(row, "prompt"), _text_field(row, "completion"), "prompt-completion")


def _alpaca(row: dict[str, Any], fmt: str) -> Example:
    extra = row.get("input") or ""
    if not isinstance(extra, str):
        raise BadFieldError("input", "is not a string")
    prompt = ALPACA_PROMPT.format(
        instruction=_text_field(row, "instruction"),
        input=f"### Input:\n{extra}\n\n" if extra.strip() else "",
    )
    return _example(prompt, _text_field(row, "output"), "alpaca")


def _text(row: dict[str, Any], fmt: str) -> Example:
    return _example("", _text_field(row, "text"), "text")


def _conversation(messages: list[dict[str, str]], layout: str) -> Example:
    """A conversation: its last assistant turn is what evaluation asks for."""
    last = max(i for i, turn in enumerate(messages) if turn["role"] == "assistant")
    answer = messages[last]["content"]
    return Example("", answer, answer, layout, messages=tuple(messages))


def _messages(row: dict[str, Any], fmt: str) -> Example:
    return _conversation(check_messages(row.get("messages"), "messages"), "messages")


def _conversational(row: dict[str, Any], fmt: str) -> Example:
    prompt = as_turns(row.get("prompt"), "prompt")
    completion = as_turns(row.get("completion"), "completion")
    if not any(turn.get("role") == "assistant" for turn in completion):
        raise BadFieldError("completion", "has no assistant turn")
    turns = check_messages(prompt + completion, "prompt + completion")
    return _conversation(turns, "conversational")


def _is_turn_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(turn, Mapping) for turn in value)


USER_LAYOUTS = (
    Layout("messages", "messages", ("messages",), "messages[{role, content}]", _messages),
    Layout(
        "conversational",
        "conversational",
        ("prompt", "completion"),
        "prompt[{role, content}], completion[{role, content}]",
        _conversational,
    ),
    Layout(
        "prompt-completion",
        "prompt-completion",
        ("prompt", "completion"),
        "prompt, completion",
        _prompt_completion,
    ),
    Layout("alpaca", "alpaca", ("instruction", "output"), "instruction, input, output", _alpaca),
    Layout("text", "text", ("text",), "text", _text),
)
USER_DATASETS = tuple(layout.dataset for layout in USER_LAYOUTS)
CONVERSATIONAL = ("messages", "conversational")


def detect(row: Any) -> Layout | None:
    """The layout of a row: the paper's first, then the users' (see the module docstring)."""
    if not isinstance(row, dict):
        return None
    for layout in (*LAYOUTS, *USER_LAYOUTS):
        if not layout.matches(row):
            continue
        conversational = _is_turn_list(row.get("prompt"))
        if layout.name == "conversational" and not conversational:
            continue
        if layout.name == "prompt-completion" and conversational:
            continue
        return layout
    return None


def describe() -> str:
    """``"gsm8k (question, answer); ...; text (text)"``, for the unknown-layout error."""
    return "; ".join(f"{layout.name} ({layout.fields})" for layout in (*LAYOUTS, *USER_LAYOUTS))


def parse_fields(text: str | Mapping[str, str] | None) -> dict[str, str]:
    """`--fields prompt=question,completion=reply` as {layout field: the user's field}.

    Raises:
        ValueError: a term without `=`, or a target name no layout reads.
    """
    if text is None or text == "" or text == {}:
        return {}
    if isinstance(text, Mapping):
        pairs = list(text.items())
    else:
        pairs = []
        for term in str(text).split(","):
            target, sep, source = (part.strip() for part in term.partition("="))
            if not sep or not target or not source:
                raise ValueError(
                    f"--fields term {term.strip()!r} is not target=source, e.g. "
                    "'prompt=question,completion=reply'"
                )
            pairs.append((target, source))
    targets = ("prompt", "completion", "messages", "instruction", "input", "output", "text")
    for target, _ in pairs:
        if target not in targets:
            raise ValueError(
                f"--fields names {target!r}, which no layout reads; map onto {', '.join(targets)}"
            )
    return {str(target): str(source) for target, source in pairs}


def map_fields(row: Any, fields: dict[str, str]) -> Any:
    """`row` with the user's field names copied onto the layout's (the originals stay)."""
    if not fields or not isinstance(row, dict):
        return row
    return {**row, **{target: row.get(source) for target, source in fields.items()}}


def check_fields_present(row: Any, fields: dict[str, str], origin: str) -> None:
    """Fail at the first row when `--fields` names a field that the data does not have."""
    if not fields or not isinstance(row, dict):
        return
    missing = [source for source in fields.values() if source not in row]
    if missing:
        raise ValueError(
            f"{origin}: --fields names {', '.join(map(repr, missing))}, which row 1 does not "
            f"have (its fields: {', '.join(sorted(row))})"
        )


def wrap_as_chat(example: Example) -> Example:
    """A plain prompt/completion example as one user turn and one assistant turn."""
    turns = (
        {"role": "user", "content": example.prompt},
        {"role": "assistant", "content": example.answer},
    )
    return Example("", example.answer, example.reference, example.dataset, messages=turns)


__all__ = [
    "CHAT_TEMPLATE_MODES",
    "CONVERSATIONAL",
    "ROLES",
    "USER_DATASETS",
    "USER_LAYOUTS",
    "check_fields_present",
    "describe",
    "detect",
    "map_fields",
    "parse_fields",
    "wrap_as_chat",
]
