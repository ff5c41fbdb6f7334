"""qseg's losses inside other people's training code: one call patches a causal LM.

    model = qseg.patch_model(model, {"cross_entropy": 0.6, "lovasz": 0.4})
    loss = model(input_ids, attention_mask=mask, labels=labels).loss   # no logits formed

The patched model computes its `loss` from the last hidden states and the head with
`qseg.losses.fused_linear_loss`, so any trainer that reads `outputs.loss` (transformers'
`Trainer`, accelerate or plain loops) trains with the mixture. TRL's trainers call the
model with `fused_lm_head=True` and read per-token fields instead of the loss; the patch
answers those calls too (see `patch_model`).

The patch replaces the model's class with a subclass of the same name whose `forward` is
a property: whatever a library assigns to `forward` later (accelerate's autocast wrapper,
TRL's fused head) is kept in the right place around or beneath the qseg forward instead of
silently replacing it.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from types import MethodType
from typing import Any

import torch
from peft import PeftModel
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from qseg.constants import CE_SCOPES, IGNORE_INDEX
from qseg.losses import fused_linear_loss, loss_kind, normalize_losses
from qseg.models import check_head_gives_the_logits, decoder_of, logit_options, output_head

# Arguments of a causal LM's forward that only concern its logits or its cache: the
# decoder alone does not take them.
_LOGITS_ONLY = ("logits_to_keep", "num_logits_to_keep", "return_dict", "use_cache", "labels")


@dataclass
class _PatchState:
    """What `unpatch_model` restores, and what the qseg forward calls."""

    original_class: type
    own_forward: Callable | None  # an instance-level forward the model had before, if any
    base_forward: Callable  # the forward that computes logits
    losses: dict[str, dict[str, Any]]
    ce_scope: str
    chunk_size: int | str
    chunk_memory: int | None
    outer: Callable | None = None  # a wrapper assigned later around the qseg forward


def patch_model(
    model: nn.Module,
    losses: str | dict,
    *,
    ce_scope: str = "answer",
    chunk_size: int | str = "auto",
    chunk_memory: int | None = None,
) -> nn.Module:
    """Make `model(..., labels=labels)` return the qseg loss mixture as `.loss`.

    The loss comes from the decoder's last hidden states and the head, chunk by chunk: no
    (batch, tokens, vocabulary) logits are formed. A call without `labels` is the model's
    own forward, unchanged (generation and evaluation get their logits).

    `labels` follow the transformers convention: (B, T), unshifted (position t is scored
    on predicting labels[:, t + 1]), IGNORE_INDEX (-100) where nothing is scored.

    Gradient accumulation: when the trainer passes `num_items_in_batch` (the scored tokens
    of the whole accumulated batch, as transformers' Trainer and TRL do), token-wise terms
    divide their sum by it, so the accumulated micro-batches update exactly as one large
    batch. Region terms (dice, Lovász, ...) are not sums over tokens: each micro-batch's
    region term is its own mean over samples, weighted by its share of the accumulated
    scored tokens, so micro-batches add up to a token-weighted mean rather than one large
    batch's value (the sample count of the whole batch is not passed by the trainers).

    Packed batches (several samples in one row, `position_ids` restarting at 0, as TRL's
    `packing=True` or padding-free collators give): token-wise terms are exact; a region
    term would mix the samples of a row into one, so such a call raises ValueError.

    TRL: its trainers call the model with `fused_lm_head=True` and compute the loss as
    `-log_probs.sum() / num_items_in_batch`. The patch answers with a `log_probs` whose
    sum is minus the qseg loss times that count (so TRL's loss is exactly the qseg loss),
    and with the sums TRL reads from `entropy` and `is_top1` (from the loss's own chunked
    pass, `return_stats`) and `label_mask`, so TRL's entropy and token accuracy are
    logged. Use TRL's default `loss_type="nll"`; other loss types reweigh `log_probs` per
    token and are not the qseg mixture.

    Args:
        model: a transformers causal LM, or a peft model wrapping one (either may be
            passed: the causal LM inside is patched, and both see the patch).
        losses: the mixture: a name, {name: weight} or {name: {"weight": w, **params}}
            (`docs/losses.md`).
        ce_scope: "answer": every term scores the labelled positions; "sequence":
            cross-entropy scores every non-pad token (by `attention_mask`) and the other
            terms the labelled ones, as `qseg train --ce-scope sequence`.
        chunk_size: rows per chunk of the fused head and loss, or "auto".
        chunk_memory: byte budget of one chunk for "auto" (None: from free memory).

    Returns:
        `model`, patched in place.
    """
    losses = normalize_losses(losses)
    if ce_scope not in CE_SCOPES:
        raise ValueError(f"ce_scope must be one of {', '.join(CE_SCOPES)}, got {ce_scope!r}")
    if chunk_size != "auto" and not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be a positive integer or 'auto', got {chunk_size!r}")
    if chunk_memory is not None and not (isinstance(chunk_memory, int) and chunk_memory > 0):
        raise ValueError(f"chunk_memory must be a positive number of bytes, got {chunk_memory!r}")
    causal_lm = causal_lm_of(model)
    if isinstance(getattr(causal_lm, "_qseg_patch", None), _PatchState):
        raise ValueError("the model is already patched by qseg; call qseg.unpatch_model first")
    check_head_gives_the_logits(causal_lm)

    cls = type(causal_lm)
    own_forward = causal_lm.__dict__.get("forward")
    state = _PatchState(
        original_class=cls,
        own_forward=own_forward,
        base_forward=own_forward or MethodType(cls.forward, causal_lm),
        losses=losses,
        ce_scope=ce_scope,
        chunk_size=chunk_size,
        chunk_memory=chunk_memory,
    )
    # The same name as the original class: save_pretrained records it as the architecture.
    patched = type(cls.__name__, (cls,), {"forward": _PatchedForward(cls)})
    patched.__module__ = cls.__module__
    causal_lm.__dict__.pop("forward", None)
    causal_lm._qseg_patch = state
    causal_lm.__class__ = patched
    return model


def unpatch_model(model: nn.Module) -> nn.Module:
    """Undo `patch_model`: the model computes its loss from full logits again.

    Args:
        model: the model given to `patch_model` (or the peft model around it).

    Returns:
        `model`, restored in place.
    """
    causal_lm = causal_lm_of(model)
    state = causal_lm.__dict__.get("_qseg_patch")
    if not isinstance(state, _PatchState):
        raise ValueError("the model is not patched by qseg")
    causal_lm.__class__ = state.original_class
    del causal_lm._qseg_patch
    if state.own_forward is not None:
        causal_lm.forward = state.own_forward
    return model


def causal_lm_of(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside `model` (itself, or the one a peft model wraps)."""
    if isinstance(model, PeftModel):
        model = model.get_base_model()
    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        raise ValueError(
            f"{type(model).__name__} is not a causal language model with an output head; "
            "pass a transformers *ForCausalLM model or a peft model wrapping one"
        )
    return model


class _PatchedForward:
    """`forward` of a patched model's class: on the class, the qseg forward function (with
    the original signature, which transformers inspects); on a model, the qseg forward or a
    wrapper that was assigned around it later."""

    def __init__(self, cls: type) -> None:
        @functools.wraps(cls.forward)
        def qseg_forward(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
            return _patched_call(model, model._qseg_patch, *args, **kwargs)

        self.function = qseg_forward

    def __get__(self, model: nn.Module | None, owner: type) -> Callable:
        if model is None:
            return self.function
        return model._qseg_patch.outer or MethodType(self.function, model)

    def __set__(self, model: nn.Module, value: Callable) -> None:
        if "fused_lm_head" in inspect.signature(value, follow_wrapped=False).parameters:
            # TRL's fused head: the qseg forward answers its calls itself.
            return
        # Anything else wraps the forward it read (accelerate's autocast): keep it outside.
        model._qseg_patch.outer = value


def _patched_call(model: nn.Module, state: _PatchState, *args: Any, **kwargs: Any) -> Any:
    fused_lm_head = kwargs.pop("fused_lm_head", False)
    labels = kwargs.get("labels")
    if labels is None:
        if fused_lm_head:
            raise ValueError("a fused_lm_head call needs labels")
        return state.base_forward(*args, **kwargs)
    signature = inspect.signature(state.base_forward)
    bound = dict(signature.bind_partial(*args, **kwargs).arguments)
    bound.update(bound.pop("kwargs", {}))
    num_items = bound.pop("num_items_in_batch", None)
    bound.pop("shift_labels", None)
    if bound.pop("output_router_logits", None):
        raise ValueError("qseg.patch_model does not compute MoE router losses")
    labels = bound["labels"]
    for name in _LOGITS_ONLY:
        bound.pop(name, None)
    position_ids = bound.get("position_ids")
    if position_ids is not None and _is_packed(position_ids):
        region = [name for name in state.losses if loss_kind(name) == "region"]
        if region:
            raise ValueError(
                f"packed batches (several samples in one row) are not supported with region "
                f"losses ({', '.join(region)}): they would score a row's samples as one; "
                "turn packing off (TRL: packing=False, padding_free=False) or use token-wise "
                "losses only"
            )
    hidden = decoder_of(model)(use_cache=False, **bound).last_hidden_state
    loss, stats = _loss_and_stats(model, state, hidden, labels, bound, num_items, fused_lm_head)
    if fused_lm_head:
        return _trl_output(loss, stats, num_items)
    return CausalLMOutputWithPast(loss=loss, logits=None)


def _is_packed(position_ids: torch.Tensor) -> bool:
    """Whether a row's positions restart at 0 after its start: several samples in it."""
    return bool((position_ids[..., 1:] == 0).any())


def _loss_and_stats(
    model: nn.Module,
    state: _PatchState,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    inputs: dict[str, Any],
    num_items: Any,
    with_stats: bool,
) -> tuple[torch.Tensor, dict[str, Any] | None]:
    """The mixture on the hidden states (B, T, d) and the labels shifted left; with
    `with_stats`, also the scored tokens' statistics (`fused_linear_loss`'s
    `return_stats`) and their mask."""
    head, options = output_head(model), logit_options(model.config)
    labels = labels.to(hidden.device)
    next_labels = nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    scored = int((next_labels != IGNORE_INDEX).sum())
    answer_losses = dict(state.losses)
    passes = {}
    if state.ce_scope == "sequence" and "cross_entropy" in answer_losses:
        passes["sequence"] = {"cross_entropy": answer_losses.pop("cross_entropy")}
    if answer_losses:
        passes["answer"] = answer_losses
    common = {"chunk_size": state.chunk_size, "chunk_memory": state.chunk_memory, **options}
    parts, stats = [], None
    for scope, losses in passes.items():
        targets = next_labels
        if scope == "sequence":
            mask = inputs.get("attention_mask")
            ids = inputs["input_ids"]
            ids = ids if mask is None else ids.masked_fill(mask == 0, IGNORE_INDEX)
            targets = nn.functional.pad(ids[:, 1:], (0, 1), value=IGNORE_INDEX)
        wants = with_stats and scope == "answer"
        part = fused_linear_loss(hidden, head, targets, losses, return_stats=wants, **common)
        part, stats = part if wants else (part, stats)
        parts.append(part)
    if with_stats and stats is None:  # only the sequence pass ran: the labels' stats apart
        with torch.no_grad():
            _, stats = fused_linear_loss(
                hidden, head, next_labels, "cross_entropy", return_stats=True, **common
            )
    loss = sum(parts[1:], parts[0])
    total = _count(num_items)
    if total is not None and scored:
        if total < scored:
            raise ValueError(
                f"num_items_in_batch ({total}) is less than the scored tokens of this batch "
                f"({scored}): it must count the whole accumulated batch"
            )
        # Token-wise terms: sum / scored * scored / total = sum / total, exactly.
        loss = loss * (scored / total)
    if not with_stats:
        return loss, None
    return loss, {**stats, "label_mask": next_labels != IGNORE_INDEX}


def _count(num_items: Any) -> int | None:
    if num_items is None:
        return None
    return int(num_items.item() if isinstance(num_items, torch.Tensor) else num_items)


def _trl_output(loss: torch.Tensor, stats: dict[str, torch.Tensor], num_items: Any) -> Any:
    """What TRL's trainers read from a `fused_lm_head=True` call, for positions 1..T-1."""
    from trl.trainer.utils import FusedCausalLMOutput

    mask = stats["label_mask"][:, :-1]
    count = _count(num_items)
    denominator = count if count is not None else max(int(mask.sum()), 1)
    # TRL only sums these fields over positions: each carries its whole sum on one entry.
    # Its loss is -log_probs.sum() / denominator, so that entry is the qseg loss's share.
    first = (torch.tensor(0), torch.tensor(0))

    def one_entry(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        zeros = torch.zeros(mask.shape, dtype=dtype, device=loss.device)
        return zeros.index_put(first, value.to(dtype=dtype, device=loss.device))

    entropy_sum = stats["entropy"] * stats["tokens"]
    return FusedCausalLMOutput(
        loss=loss,
        log_probs=one_entry(-loss * denominator, loss.dtype),
        entropy=one_entry(entropy_sum, torch.float32),
        is_top1=one_entry(stats["correct"], torch.long),
        label_mask=mask,
    )
