"""The public entry points: fused (hidden states + head) and full-logits losses.

Both paths pick the valid tokens, reduce them to the small inputs of
`functional` (label log-probabilities, and for region losses the log-probabilities of
the classes present), and combine the mixture there. Only the way those inputs are
obtained differs: chunk by chunk from the head, or from logits the caller already has.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from . import engine, functional, kernels, passes
from .autotune import plan_chunks
from .head import head_weight_shape, linear_parts
from .inputs import REDUCTIONS, ValidTokens, check_options, check_shapes, is_int, normalizers
from .mixture import class_stats, combine, empty_shape, zero_loss
from .registry import normalize_losses, split_by_kind
from .stats import TokenStats
from .transform import LogitTransform


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
    logit_softcap: float | None = None,
    logit_scale: float | None = None,
    reduction: str = "mean",
    token_weights: Tensor | None = None,
    return_stats: bool = False,
    impl: str = "auto",
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
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
        logit_softcap: c > 0: the logits are c·tanh(z / c), as Gemma 2 caps them.
        logit_scale: s > 0: the logits are s·(h Wᵀ + b), before any cap (Cohere's
            logit_scale; Granite's is 1 / logits_scaling).
        reduction: "mean" (as described above), "sum" (token-wise terms summed, region
            terms summed over groups) or "none" (see Returns).
        token_weights: (B, T) finite weights >= 0, token-wise terms only: each
            position's term is multiplied by its weight; the mean still divides by the
            number of scored tokens.
        return_stats: also return the scored tokens' statistics (see Returns).
        impl: how each chunk's pass over its logits runs: "torch", as torch operations;
            "triton", as fused Triton kernels (one launch per chunk) where the options
            are the plain ones (no logit transform, smoothing, z-loss, token weights or
            stats; torch otherwise); "auto", torch unless `QSEG_TRITON=1` asks for the
            kernels (`kernels.uses_triton`).

    Returns:
        A 0-dim tensor, float32 (float64 for float64 inputs). With reduction "none":
        token-wise terms per position (labels' shape, 0 where ignored), or region terms
        per sample (B,) (0 for a sample without a valid token). With `return_stats`,
        (loss, stats), stats 0-dim tensors without gradient: "tokens" (scored), "correct"
        (scored tokens whose label is their row's argmax), "entropy" (their mean
        predictive entropy, in nats).
    """
    if impl not in kernels.IMPLS:
        raise ValueError(f"impl must be one of {kernels.IMPLS}; got {impl!r}")
    mixture = normalize_losses(losses)
    transform = LogitTransform.checked(logit_softcap, logit_scale)
    vocab, dim = head_weight_shape(weight)
    check_shapes(hidden, labels, "hidden")
    if hidden.shape[-1] != dim:
        raise ValueError(f"hidden size {hidden.shape[-1]} does not match the head's d={dim}")
    if bias is not None and (
        not isinstance(bias, Tensor) or not bias.is_floating_point() or bias.shape != (vocab,)
    ):
        got = f"{bias.dtype} {tuple(bias.shape)}" if isinstance(bias, Tensor) else type(bias)
        raise ValueError(f"bias must be a floating-point tensor of shape ({vocab},); got {got}")
    check_options(mixture, reduction, token_weights, labels, num_tokens, num_samples)
    tokens = ValidTokens.select(labels, vocab, ignore_index)
    num_tokens, num_samples = normalizers(num_tokens, num_samples, tokens)
    if tokens.index.numel() == 0:
        head = weight.parameters() if isinstance(weight, nn.Module) else [weight]
        loss = zero_loss(empty_shape(mixture, reduction, labels), hidden, bias, *head)
        stats = TokenStats(tokens.labels, loss.dtype) if return_stats else None
        return (loss, stats.summary()) if return_stats else loss
    # The engine gathers each chunk's scored rows itself: no (n, d) copy of the hidden
    # states, and their gradient is written straight into the (B·T, d) result.
    h = hidden.reshape(-1, dim)
    index = None if tokens.index.numel() == h.shape[0] else tokens.index
    hiddens, weights, bias = _head_parts(weight, h, bias)
    plain = len(weights) == 1 and bias is None and transform.is_identity
    rows = _chunk_rows(chunk_size, chunk_memory, mixture, tokens, h, vocab, weights[0], plain)
    dtype = engine.accumulation_dtype(*hiddens, *weights, bias)
    bias = bias.to(dtype) if bias is not None else None
    needs_lse, needs_mean = functional.token_needs(split_by_kind(mixture)[0])
    use_triton = (
        kernels.uses_triton(impl, hidden.device, dtype)
        and not (needs_lse or needs_mean or token_weights is not None or return_stats)
        and transform.is_identity
    )
    options = passes.PassOptions(
        transform,
        needs_lse,
        needs_mean,
        None if token_weights is None else token_weights.reshape(-1)[tokens.index].to(dtype),
        TokenStats(tokens.labels, dtype) if return_stats else None,
        use_triton,
    )
    # The engine and the mixture manage their own precision; autocast would recast them.
    with torch.autocast(hidden.device.type, enabled=False):
        loss = _fused_mixture(
            mixture, tokens, rows, hiddens, weights, bias, index, options, reduction,
            (num_tokens, num_samples), labels.shape,
        )  # fmt: skip
    return (loss, options.stats.summary()) if return_stats else loss


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
    options: passes.PassOptions,
    reduction: str,
    counts: tuple[int | None, int | None],
    labels_shape: torch.Size,
) -> Tensor:
    """The mixture through the engine: one fused pass when the result is a sum over
    tokens, else column log-probs (and lse, mean logit) and `combine`."""
    token_part, region_part = split_by_kind(mixture)
    num_tokens, num_samples = counts
    if not region_part and reduction != "none":
        if options.use_triton and kernels.TokenTerms.supports(token_part):
            per_token = kernels.TokenTerms.from_losses(token_part)
        else:
            per_token = functional.weighted_token_loss(token_part)
        count = tokens.labels.shape[0] if num_tokens is None else num_tokens
        scale = 1 / count if reduction == "mean" else 1.0
        return passes.token_loss(
            tokens.labels, per_token, scale, rows, hiddens, weights, bias, index, options
        )
    classes, target = torch.unique(tokens.labels, return_inverse=True)
    with_rest = functional.needs_rest(region_part)
    logp = passes.column_log_probs(classes, rows, hiddens, weights, bias, index, with_rest, options)
    k = classes.shape[0] + with_rest
    stats = class_stats(logp[:, :k], target, tokens, with_rest)
    lse, mean = (logp[:, k], logp[:, k + 1]) if options.needs_lse else (None, None)
    inputs = functional.TokenInputs(stats.label_logp(), lse, mean)
    return combine(
        mixture, tokens, inputs, stats, reduction, options.token_weights,
        num_tokens, num_samples, labels_shape,
    )  # fmt: skip


def _chunk_rows(
    chunk_size: int | str,
    chunk_memory: int | None,
    mixture: dict,
    tokens: ValidTokens,
    h: Tensor,
    vocab: int,
    weight: Tensor,
    plain_head: bool,
) -> int:
    """Rows per chunk: `chunk_size` checked, or the tuner's pick for the (N, d) hidden
    states `h` and the head's first part `weight` as the engine will multiply it;
    `plain_head`: one part, no bias, untransformed logits (see `plan_chunks`)."""
    chunk_size = _checked_chunk_size(chunk_size)
    if chunk_size == "auto":
        plan = plan_chunks(
            tokens.index.numel(),
            vocab,
            h.shape[1],
            weight.dtype,
            mixture,
            device=weight.device,
            chunk_memory=chunk_memory,
            positions=h.shape[0],
            plain_head=plain_head,
        )
        return plan.rows
    return chunk_size


def _checked_chunk_size(chunk_size: Any) -> int | str:
    if chunk_size == "auto":
        return chunk_size
    if not is_int(chunk_size) or chunk_size < 1:
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
    OPTIONS = (
        "chunk_size",
        "chunk_memory",
        "ignore_index",
        "logit_softcap",
        "logit_scale",
        "reduction",
        "return_stats",
        "impl",
    )

    def __init__(self, losses: str | dict, **options: Any):
        super().__init__()
        self.mixture = normalize_losses(losses)
        unknown = sorted(set(options) - set(self.OPTIONS))
        if unknown:
            raise ValueError(
                f"unknown FusedLinearLoss option(s) {unknown}; allowed: {list(self.OPTIONS)} "
                "(bias, num_tokens, num_samples and token_weights go to forward)"
            )
        if "chunk_size" in options:
            _checked_chunk_size(options["chunk_size"])
        LogitTransform.checked(options.get("logit_softcap"), options.get("logit_scale"))
        if options.get("impl", "auto") not in kernels.IMPLS:
            raise ValueError(f"impl must be one of {kernels.IMPLS}; got {options['impl']!r}")
        if options.get("reduction", "mean") not in REDUCTIONS:
            raise ValueError(
                f"reduction must be one of {', '.join(REDUCTIONS)}; got {options['reduction']!r}"
            )
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
        token_weights: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """hidden (B, T, d), head (see `fused_linear_loss`), labels (B, T) -> the loss
        (0-dim unless reduction="none"; with return_stats, (loss, stats)); `bias` (V,)
        only with a weight tensor as the head; `token_weights` (B, T)."""
        return fused_linear_loss(
            hidden,
            head,
            labels,
            self.mixture,
            bias=bias,
            num_tokens=num_tokens,
            num_samples=num_samples,
            token_weights=token_weights,
            **self.options,
        )

    def extra_repr(self) -> str:
        return f"losses={self.mixture}, options={self.options}"
