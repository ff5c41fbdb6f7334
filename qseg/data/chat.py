"""Conversations: their checks, and their rendering into context and answer spans.

A conversation renders to a list of segments ``(text, scored)``: each assistant turn is
scored (its content and what the template closes the turn with, such as ChatML's
``<|im_end|>``, so the end of a turn is learned), everything else is context. With the
tokenizer's chat template the spans come from rendering growing prefixes of the
conversation: the text an assistant turn adds after the generation prompt is its span.
Without a template (``--chat-template never``) each turn is a ``role: content`` line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from qseg.data.formats import BadFieldError

ROLES = ("system", "user", "assistant")
# Models whose tokenizers carry a chat template, named when one is missing.
TEMPLATE_EXAMPLES = "instruct or chat models, e.g. SmolLM2-135M-Instruct, Qwen2.5-*-Instruct"

Segment = tuple[str, bool]


def as_turns(value: Any, field: str) -> list[dict[str, Any]]:
    """A list of message mappings, or BadFieldError naming `field`."""
    if not isinstance(value, list) or not all(isinstance(turn, Mapping) for turn in value):
        raise BadFieldError(field, "is not a list of {role, content} messages")
    return [dict(turn) for turn in value]


def check_messages(value: Any, field: str) -> list[dict[str, str]]:
    """The conversation's turns as {"role", "content"}, checked.

    Raises:
        BadFieldError: not a list of messages, a role outside system/user/assistant, a
            content that is not a string, an empty assistant turn, or no assistant turn.
    """
    turns = []
    for number, turn in enumerate(as_turns(value, field), 1):
        role, content = turn.get("role"), turn.get("content")
        if role not in ROLES:
            raise BadFieldError(
                field, f"turn {number} has role {role!r}; allowed roles: {', '.join(ROLES)}"
            )
        if not isinstance(content, str):
            raise BadFieldError(field, f"turn {number} ({role}) has no text content")
        if role == "assistant" and not content.strip():
            raise BadFieldError(field, f"turn {number} is an empty assistant turn")
        turns.append({"role": role, "content": content})
    if not any(turn["role"] == "assistant" for turn in turns):
        raise BadFieldError(field, "has no assistant turn: nothing to learn")
    return turns


def has_template(tokenizer: Any) -> bool:
    """Whether `tokenizer` carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def require_template(tokenizer: Any, why: str) -> None:
    """Raise ValueError, saying which models have one, when `tokenizer` has no template."""
    if not has_template(tokenizer):
        raise ValueError(
            f"{why}, but this model's tokenizer has no chat template; use a model that has "
            f"one ({TEMPLATE_EXAMPLES}) or pass --chat-template never"
        )


def _render(tokenizer: Any, turns: Sequence[Mapping[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        list(turns), tokenize=False, add_generation_prompt=generation_prompt
    )


def segments(turns: Sequence[Mapping[str, str]], tokenizer: Any, template: bool) -> list[Segment]:
    """The conversation as (text, scored) segments; their texts joined are the whole render.

    Args:
        turns: checked messages (`check_messages`).
        tokenizer: its `apply_chat_template` renders them when `template` is True.
        template: render with the chat template; else as plain `role: content` lines.

    Returns:
        Segments in order; each assistant turn's is scored.

    Raises:
        ValueError: the template renders a conversation's prefix as something other than
            the beginning of the whole (then its assistant spans cannot be found).
    """
    if not template:
        parts = []
        for turn in turns:
            parts.append((f"{turn['role']}: ", False))
            parts.append((turn["content"] + "\n", turn["role"] == "assistant"))
        return parts
    parts, done = [], ""
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        before = _render(tokenizer, turns[:i], True)
        upto = _render(tokenizer, turns[: i + 1], False)
        if not (before.startswith(done) and upto.startswith(before)):
            raise ValueError(
                "the tokenizer's chat template does not render a conversation's beginning as "
                "the beginning of the whole, so its assistant turns cannot be located; pass "
                "--chat-template never"
            )
        parts += [(before[len(done) :], False), (upto[len(before) :], True)]
        done = upto
    rest = _render(tokenizer, turns, False)[len(done) :]
    return [part for part in (*parts, (rest, False)) if part[0]]


def generation_prompt(turns: Sequence[Mapping[str, str]], tokenizer: Any, template: bool) -> str:
    """The text before the conversation's last assistant turn, ready for the model to answer.

    Args:
        turns: checked messages.
        tokenizer: renders them when `template` is True.
        template: as in `segments`.

    Returns:
        The context up to the last assistant turn, with the template's generation prompt.
    """
    last = max(i for i, turn in enumerate(turns) if turn["role"] == "assistant")
    if template:
        return _render(tokenizer, turns[:last], True)
    context = "".join(text for text, _ in segments(turns[:last], tokenizer, False))
    return context + "assistant: "
