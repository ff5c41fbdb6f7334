"""The public entry points: fused (hidden states + head) and full-logits losses.

Both paths pick the valid tokens, reduce them to the small inputs of
`functional` (label log-probabilities, and for region losses the log-probabilities of
the classes present), and combine the mixture there. Only the way those inputs are
obtained differs: chunk by chunk from the head, or from logits the caller already has.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from . import engine, functional, kernels, passes
from .autotune import plan_chunks
from .head import head_weight_shape, linear_parts
from .registry import normalize_losses, split_by_kind


@dataclass
class ValidTokens:
    """The positions that take part in the loss, flattened.

    Attributes:
        index: (n,) positions in the flattened (B·T) input.
        labels: (n,) their labels.
        sample: (n,) their sample, renumbered 0..S-1 over samples with a valid token.
        num_samples: S.
    """

    index: Tensor
    labels: Tensor
    sample: Tensor
    num_samples: int

    @classmethod
    def select(cls, labels: Tensor, vocab: int, ignore_index: int) -> ValidTokens:
        if not _is_int(ignore_index):
            raise ValueError(f"ignore_index must be an int (default -100); got {ignore_index!r}")
        if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"labels must be an integer tensor (torch.long); got {labels.dtype}")
        per_sample = labels.flatten(1) if labels.dim() > 1 else labels[None]
        flat = per_sample.reshape(-1)
        index = (flat != ignore_index).nonzero().squeeze(1)
        valid = flat[index]
        bad = (valid < 0) | (valid >= vocab)
        if bad.any():
            raise ValueError(
                f"labels must be in [0, {vocab}) (the vocabulary size) or ignore_index="
                f"{ignore_index}; found {valid[bad][0].item()}"
            )
        samples, sample = torch.unique(index // per_sample.shape[1], return_inverse=True)
        return cls(index, valid.long(), sample, samples.numel())


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_shapes(features: Tensor, labels: Tensor, what: str) -> None:
    for name, value in ((what, features), ("labels", labels)):
        if not isinstance(value, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor; got {type(value).__name__}")
    if not features.is_floating_point():
        raise ValueError(f"{what} must be a floating-point tensor; got {features.dtype}")
    if features.dim() < 2 or features.shape[:-1] != labels.shape:
        raise ValueError(
            f"{what} of shape {tuple(features.shape)} does not line up with labels of shape "
            f"{tuple(labels.shape)}: expected {what} (*labels.shape, {what[0]}) with labels "
            f"(B, T) already aligned (no shift happens inside)"
        )


def _normalizers(
    num_tokens: Any, num_samples: Any, tokens: ValidTokens
) -> tuple[int | None, int | None]:
    """`num_tokens` and `num_samples` checked: they count the whole accumulated batch
    (across processes too), so at least this batch's valid tokens and samples."""
    samples = "samples with a valid token"
    return (
        _checked_count("num_tokens", num_tokens, tokens.index.numel(), "valid tokens"),
        _checked_count("num_samples", num_samples, tokens.num_samples, samples),
    )


def _checked_count(name: str, value: Any, here: int, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    if not _is_int(value) or value < here:
        raise ValueError(
            f"{name} must be None or an int at least the {here} {what} here (it counts those "
            f"of the whole accumulated batch); got {value!r}"
        )
    return int(value)


def _mixture_loss(
    mixture: dict[str, dict[str, Any]],
    tokens: ValidTokens,
    label_logp: Tensor,
    stats: functional.ClassStats | None,
    num_tokens: int | None,
    num_samples: int | None,
) -> Tensor:
    """Σ weight · loss from the small inputs; the normalizers default to this batch's."""
    token_part, region_part = split_by_kind(mixture)
    loss = label_logp.new_zeros(())
    if token_part:
        per_token = functional.weighted_token_loss(token_part)
        count = label_logp.shape[0] if num_tokens is None else num_tokens
        loss = loss + per_token(label_logp).sum() / count
    if region_part:
        share = 1.0 if num_samples is None else tokens.num_samples / num_samples
        loss = loss + functional.region_loss(region_part, stats, share)
    return loss


def _zero_loss(*inputs: Tensor | None) -> Tensor:
    """0, connected to every input that requires grad, so backward gives zero gradients."""
    dtype = engine.accumulation_dtype(*inputs)
    zero = torch.zeros((), dtype=dtype, device=inputs[0].device)
    for t in inputs:
        if t is not None and t.requires_grad:
            zero = zero + t.reshape(-1)[:0].sum().to(dtype)
    return zero


def _class_stats(
    logp: Tensor, target: Tensor, tokens: ValidTokens, with_rest: bool
) -> functional.ClassStats:
    """From (n, k) column log-probabilities, plus the rest's as column k `with_rest`."""
    k = logp.shape[1] - with_rest
    rest = logp[:, k] if with_rest else None
    return functional.ClassStats(logp[:, :k], target, tokens.sample, tokens.num_samples, rest)


def fused_linear_loss(
    hidden: Tensor,
    weight: Tensor | nn.Module,
    labels: Tensor,
    losses: str | dict,
    *,
    bias: Tensor | None = None,
    chunk_size: int | str = "auto",
    chunk_memory: int | None = None,
    ignore_index: int = -100,
    num_tokens: int | None = None,
    num_samples: int | None = None,
    impl: str = "auto",
) -> Tensor:
    """A loss mixture from hidden states and the output head, never holding full logits.

    Args:
        hidden: (B, T, d) final hidden states, any float dtype. (N, d) with labels (N,)
            is one sample of N tokens: token-wise losses are the same either way, region
            losses are per sample, so keep (B, T, d) for them.
        weight: the head: a (V, d) weight tensor, an nn.Linear, a peft LoRA-wrapped
            linear or modules_to_save copy, or a bitsandbytes Linear4bit / Linear8bitLt.
        labels: (B, T) integer labels aligned with `hidden` (no shift happens here);
            `ignore_index` marks positions that take no part.
        losses: a name, {name: weight} or {name: {"weight": w, **params}}.
        bias: (V,) optional, with a weight tensor only.
        chunk_size: rows per chunk, or "auto" to let `plan_chunks` size them.
        chunk_memory: byte budget of one chunk for "auto" (None: from free memory).
        num_tokens: divide token-wise terms by this instead of the number of valid tokens
            here (gradient accumulation: the valid tokens of the whole accumulated batch),
            so at least that number.
        num_samples: scale region terms by (samples here) / num_samples (likewise: the
            samples with a valid token of the whole batch).
        impl: how each chunk's pass over its logits runs: "triton", as fused Triton
            kernels (one launch per chunk); "torch", as torch operations; "auto", torch
            unless `QSEG_TRITON=1` asks for the kernels (`kernels.uses_triton`).

    Returns:
        A 0-dim tensor, float32 (float64 for float64 inputs).
    """
    mixture = normalize_losses(losses)
    if impl not in kernels.IMPLS:
        raise ValueError(f"impl must be one of {kernels.IMPLS}; got {impl!r}")
    vocab, dim = head_weight_shape(weight)
    _check_shapes(hidden, labels, "hidden")
    if hidden.shape[-1] != dim:
        raise ValueError(f"hidden size {hidden.shape[-1]} does not match the head's d={dim}")
    if bias is not None and (
        not isinstance(bias, Tensor) or not bias.is_floating_point() or bias.shape != (vocab,)
    ):
        got = f"{bias.dtype} {tuple(bias.shape)}" if isinstance(bias, Tensor) else type(bias)
        raise ValueError(f"bias must be a floating-point tensor of shape ({vocab},); got {got}")
    tokens = ValidTokens.select(labels, vocab, ignore_index)
    num_tokens, num_samples = _normalizers(num_tokens, num_samples, tokens)
    if tokens.index.numel() == 0:
        head = weight.parameters() if isinstance(weight, nn.Module) else [weight]
        return _zero_loss(hidden, bias, *head)
    # The engine gathers each chunk's scored rows itself: no (n, d) copy of the hidden
    # states, and their gradient is written straight into the (B·T, d) result.
    h = hidden.reshape(-1, dim)
    index = None if tokens.index.numel() == h.shape[0] else tokens.index
    hiddens, weights, bias = _head_parts(weight, h, bias)
    rows = _chunk_rows(chunk_size, chunk_memory, mixture, tokens, h, vocab, weights, bias)
    dtype = engine.accumulation_dtype(*hiddens, *weights, bias)
    bias = bias.to(dtype) if bias is not None else None
    use_triton = kernels.uses_triton(impl, hidden.device, dtype)
    # The engine and the mixture manage their own precision; autocast would recast them.
    with torch.autocast(hidden.device.type, enabled=False):
        return _fused_mixture(
            mixture,
            tokens,
            rows,
            hiddens,
            weights,
            bias,
            index,
            num_tokens,
            num_samples,
            use_triton,
        )


def _head_parts(
    weight: Tensor | nn.Module, h: Tensor, bias: Tensor | None
) -> tuple[list[Tensor], list[Tensor], Tensor | None]:
    """The head's parts (`linear_parts`) in the dtypes the engine multiplies. Under
    autocast on CUDA, float32 parts are cast to the autocast dtype once for all chunks: the
    matmuls then run as `hidden @ W.T` would under that autocast. Elsewhere half products
    are upcast anyway, so autocast is off and float32 parts (LoRA's included) stay float32."""
    device = h.device
    if not torch.is_autocast_enabled(device.type) or engine.upcasts_half_products(device):
        with torch.autocast(device.type, enabled=False):
            return linear_parts(weight, h, bias)
    hiddens, weights, bias = linear_parts(weight, h, bias)
    low = torch.get_autocast_dtype(device.type)

    def cast(parts: list[Tensor]) -> list[Tensor]:
        return [p.to(low) if p.dtype == torch.float32 else p for p in parts]

    return cast(hiddens), cast(weights), bias


def _fused_mixture(
    mixture: dict[str, dict[str, Any]],
    tokens: ValidTokens,
    rows: int,
    hiddens: list[Tensor],
    weights: list[Tensor],
    bias: Tensor | None,
    index: Tensor | None,
    num_tokens: int | None,
    num_samples: int | None,
    use_triton: bool = False,
) -> Tensor:
    """The mixture through the engine: one fused pass, or column log-probs and functional."""
    token_part, region_part = split_by_kind(mixture)
    if not region_part:
        if use_triton and kernels.TokenTerms.supports(token_part):
            per_token = kernels.TokenTerms.from_losses(token_part)
        else:
            per_token = functional.weighted_token_loss(token_part)
        scale = 1 / (tokens.labels.shape[0] if num_tokens is None else num_tokens)
        return passes.token_loss(
            tokens.labels, per_token, scale, rows, hiddens, weights, bias, index
        )
    classes, target = torch.unique(tokens.labels, return_inverse=True)
    with_rest = functional.needs_rest(region_part)
    logp = passes.column_log_probs(
        classes, rows, hiddens, weights, bias, index, with_rest, use_triton
    )
    stats = _class_stats(logp, target, tokens, with_rest)
    return _mixture_loss(mixture, tokens, stats.label_logp(), stats, num_tokens, num_samples)


def _chunk_rows(
    chunk_size: int | str,
    chunk_memory: int | None,
    mixture: dict,
    tokens: ValidTokens,
    h: Tensor,
    vocab: int,
    weights: list[Tensor],
    bias: Tensor | None,
) -> int:
    """Rows per chunk: `chunk_size` checked, or the tuner's pick for the (N, d) hidden
    states `h` and the head's parts (`weights`, `bias`) as the engine will multiply them."""
    chunk_size = _checked_chunk_size(chunk_size)
    if chunk_size == "auto":
        plan = plan_chunks(
            tokens.index.numel(),
            vocab,
            h.shape[1],
            weights[0].dtype,
            mixture,
            device=weights[0].device,
            chunk_memory=chunk_memory,
            positions=h.shape[0],
            plain_head=len(weights) == 1 and bias is None,
        )
        return plan.rows
    return chunk_size


def _checked_chunk_size(chunk_size: Any) -> int | str:
    if chunk_size == "auto":
        return chunk_size
    if not _is_int(chunk_size) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or 'auto'; got {chunk_size!r}")
    return int(chunk_size)


class FusedLinearLoss(nn.Module):
    """`fused_linear_loss` as a module: the mixture is checked once, at construction.

    Example:
        >>> loss_fn = FusedLinearLoss({"cross_entropy": 0.6, "generalized_dice": 0.4})
        >>> loss = loss_fn(hidden, model.lm_head, labels)
    """

    # Options fixed at construction. The normalizers change per step and a bias belongs to
    # the model (its parameter, moved and saved with it), so forward takes them.
    OPTIONS = ("chunk_size", "chunk_memory", "ignore_index", "impl")

    def __init__(self, losses: str | dict, **options: Any):
        super().__init__()
        self.mixture = normalize_losses(losses)
        unknown = sorted(set(options) - set(self.OPTIONS))
        if unknown:
            raise ValueError(
                f"unknown FusedLinearLoss option(s) {unknown}; allowed: {list(self.OPTIONS)} "
                "(bias, num_tokens and num_samples go to forward)"
            )
        if "chunk_size" in options:
            _checked_chunk_size(options["chunk_size"])
        if options.get("impl", "auto") not in kernels.IMPLS:
            raise ValueError(f"impl must be one of {kernels.IMPLS}; got {options['impl']!r}")
        self.options = options

    def forward(
        self,
        hidden: Tensor,
        head: Tensor | nn.Module,
        labels: Tensor,
        *,
        bias: Tensor | None = None,
        num_tokens: int | None = None,
        num_samples: int | None = None,
    ) -> Tensor:
        """hidden (B, T, d), head (see `fused_linear_loss`), labels (B, T) -> 0-dim loss;
        `bias` (V,) only with a weight tensor as the head."""
        return fused_linear_loss(
            hidden,
            head,
            labels,
            self.mixture,
            bias=bias,
            num_tokens=num_tokens,
            num_samples=num_samples,
            **self.options,
        )

    def extra_repr(self) -> str:
        return f"losses={self.mixture}, options={self.options}"
