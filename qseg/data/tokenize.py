"""Token ids and labels for causal-LM fine-tuning, and the collator that batches them.

The prompt and the answer are tokenized separately and their ids concatenated, so the
answer span is exact whatever the tokenizer merges across the boundary:

    input_ids = [BOS] + prompt ids + answer ids + [EOS]
    labels    = -100 ... -100      + answer ids + [EOS]     (same length; not shifted)

EOS is learned so generation knows where to stop. A sequence longer than ``max_length``
loses prompt tokens from the left (BOS stays first); answer tokens are never cut, and an
example whose answer and EOS alone do not fit is dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from qseg.constants import IGNORE_INDEX, PADDING_SIDES
from qseg.data.chat import generation_prompt, segments
from qseg.data.formats import Example, format_prompt

log = logging.getLogger(__name__)


def _bos(tokenizer: Any) -> list[int]:
    """``[bos_token_id]`` when the tokenizer puts one in front of a text (Llama), else ``[]``."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if ids and ids[0] == bos else []


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_prompt(example: Example, tokenizer: Any, max_length: int | None = None) -> list[int]:
    """Prompt ids: BOS (if used) + prompt, cut from the left to ``max_length`` if given.

    Training cuts prompts to leave room for the answer; evaluation passes no
    ``max_length``: the model reads the whole question.
    """
    if example.messages is not None:
        bos = [] if example.template else _bos(tokenizer)  # a template writes its own BOS
        prompt = _ids(tokenizer, generation_prompt(example.messages, tokenizer, example.template))
    else:
        bos, prompt = _bos(tokenizer), _ids(tokenizer, format_prompt(example))
    if max_length is not None:
        keep = max(max_length - len(bos), 0)
        prompt = prompt[-keep:] if keep else []
    return bos + prompt


def answer_length(example: Example, tokenizer: Any) -> int:
    """Tokens of the answer the model is trained to write, its EOS included."""
    return len(_ids(tokenizer, example.answer)) + 1


def tokenize_example(
    example: Example, tokenizer: Any, max_length: int
) -> dict[str, list[int]] | None:
    """Example -> ``{"input_ids", "attention_mask", "labels"}`` lists of one length (<= max_length).

    Returns None when BOS + answer + EOS is longer than ``max_length``.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; set tokenizer.eos_token first")
    if example.messages is not None:
        return _tokenize_conversation(example, tokenizer, max_length, eos)
    answer = _ids(tokenizer, example.answer) + [eos]
    if len(_bos(tokenizer)) + len(answer) > max_length:
        return None
    prompt = encode_prompt(example, tokenizer, max_length - len(answer))
    return {
        "input_ids": prompt + answer,
        "attention_mask": [1] * (len(prompt) + len(answer)),
        "labels": [IGNORE_INDEX] * len(prompt) + answer,
    }


def _tokenize_conversation(
    example: Example, tokenizer: Any, max_length: int, eos: int
) -> dict[str, list[int]] | None:
    """A conversation's ids, every assistant span scored; too long, it loses context tokens
    from the left, never a scored one (None when that would not be enough)."""
    ids, labels = [], []
    if not example.template:
        ids = labels = _bos(tokenizer)
        labels = [IGNORE_INDEX] * len(ids)
    for text, scored in segments(example.messages, tokenizer, example.template):
        piece = _ids(tokenizer, text)
        ids = ids + piece
        labels = labels + (piece if scored else [IGNORE_INDEX] * len(piece))
    if not example.template:  # a template closes assistant turns itself; plain lines end with EOS
        ids, labels = ids + [eos], labels + [eos]
    cut = len(ids) - max_length
    if cut > 0:
        if any(label != IGNORE_INDEX for label in labels[:cut]):
            return None
        ids, labels = ids[cut:], labels[cut:]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def build_dataset(
    examples: Iterable[Example], tokenizer: Any, max_length: int
) -> tuple[list[dict[str, list[int]]], int]:
    """Tokenize every example; returns (features, number dropped because the answer is too long)."""
    features, dropped = [], 0
    for example in examples:
        feature = tokenize_example(example, tokenizer, max_length)
        if feature is None:
            dropped += 1
        else:
            features.append(feature)
    if dropped:
        log.warning(
            "dropped %d of %d examples: answer + EOS longer than max_length %d",
            dropped,
            dropped + len(features),
            max_length,
        )
    return features, dropped


@dataclass
class DataCollator:
    """Pads a list of features into a batch of (B, T) long tensors, T = the longest feature.

    ``input_ids`` are padded with ``pad_token_id``, ``labels`` with -100 and
    ``attention_mask`` with 0. The pad id never reaches a loss or an attention score, so the
    default 0 is as good as the tokenizer's own. Right padding suits training; left padding
    lines prompts up at the end for batched generation.
    """

    pad_token_id: int = 0
    padding_side: str = "right"

    def __post_init__(self) -> None:
        if self.padding_side not in PADDING_SIDES:
            raise ValueError(
                f"padding_side must be one of {', '.join(PADDING_SIDES)}, got '{self.padding_side}'"
            )

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        length = max(len(feature["input_ids"]) for feature in features)
        pad_values = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        batch = {}
        for key, pad_value in pad_values.items():
            if key not in features[0]:
                continue
            rows = []
            for feature in features:
                padding = [pad_value] * (length - len(feature[key]))
                row = list(feature[key])
                rows.append(row + padding if self.padding_side == "right" else padding + row)
            batch[key] = torch.tensor(rows, dtype=torch.long)
        return batch
