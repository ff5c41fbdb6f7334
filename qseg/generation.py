"""Batched greedy generation: what `qseg eval` and the held-out evaluation read answers from."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm import tqdm


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    *,
    batch_size: int,
    max_new_tokens: int,
) -> list[str]:
    """Greedy continuations of ``prompts``, one string per prompt, in order.

    A prompt is a text (tokenized with the tokenizer's own special tokens) or a list of
    token ids (:func:`evaluate` passes ``qseg.data.encode_prompt`` ids, exactly what
    training fed the model). Prompts are sorted by length, so a batch holds prompts of
    similar length, and left padded: every prompt ends at the last position, where
    generation starts, and the attention mask hides the padding. A continuation stops at
    the tokenizer's EOS (not included) or after ``max_new_tokens`` tokens; special tokens
    are dropped when decoding.

    Args:
        model: a causal LM (with or without an adapter); its train/eval mode is restored.
        tokenizer: its tokenizer, with an EOS token.
        prompts: texts, or token id lists.
        batch_size: prompts per ``generate`` call.
        max_new_tokens: the longest continuation, in tokens.

    Returns:
        The decoded continuations, in the order of ``prompts``.

    Raises:
        ValueError: a batch size or token limit below 1, no EOS token, or an empty prompt.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(
            f"batch_size ({batch_size}) and max_new_tokens ({max_new_tokens}) must be >= 1"
        )
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("the tokenizer has no EOS token; generation could not stop")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    device = next(model.parameters()).device

    encoded = [
        list(tokenizer(prompt)["input_ids"]) if isinstance(prompt, str) else list(prompt)
        for prompt in prompts
    ]
    if any(not ids for ids in encoded):
        raise ValueError("a prompt is empty; generation needs at least one token to start from")
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]), reverse=True)
    predictions = [""] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        batches = range(0, len(order), batch_size)
        for start in tqdm(batches, desc="generating", unit="batch", leave=False):
            indices = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in indices)
            input_ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(indices), width), dtype=torch.long)
            for row, i in enumerate(indices):
                ids = encoded[i]
                input_ids[row, width - len(ids) :] = torch.tensor(ids)
                attention_mask[row, width - len(ids) :] = 1
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                use_cache=True,  # training may have switched the cache off in the config
                pad_token_id=pad_id,
                eos_token_id=eos_id,
            )
            for row, i in enumerate(indices):
                new_tokens = output[row, width:].tolist()
                if eos_id in new_tokens:
                    new_tokens = new_tokens[: new_tokens.index(eos_id)]
                predictions[i] = tokenizer.decode(new_tokens, skip_special_tokens=True)
    finally:
        model.train(was_training)
    return predictions
