"""The two autograd functions of the chunked engine, and the calls the API makes.

- `TokenLossFunction`, for mixtures of token-wise losses only. Each token's gradient
  depends on that token alone, so it is formed during the forward, chunk by chunk; the
  backward only scales it.
- `HeadColumnsFunction`, for everything else. The forward returns each row's
  log-probabilities of a small set of columns (the classes present in the batch); the
  loss is then ordinary autograd on that small tensor. The backward recomputes each
  chunk's softmax to turn the small upstream gradient into the logit gradient
  dz = scatter(g) − p · Σg, never storing it.

Both walk the rows with `qseg.losses.engine`'s chunk machinery (looked up on the module,
so that it is one definition for both).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from . import engine, kernels
from .functional import TokenInputs
from .stats import TokenStats
from .transform import LogitTransform


def _refuse_double_backward() -> None:
    # Autograd runs a backward with grad enabled only for create_graph=True. These
    # backwards are not differentiable: their result would silently lack the second order.
    if torch.is_grad_enabled():
        raise RuntimeError(
            "qseg's fused losses have no second derivative (create_graph=True, double "
            "backward); for gradient penalties or higher-order gradients compute the loss "
            "with loss_from_logits on the full logits"
        )


def _split_parts(parts: Sequence[Tensor]) -> tuple[Sequence[Tensor], Sequence[Tensor]]:
    return parts[0::2], parts[1::2]


@dataclass(frozen=True)
class PassOptions:
    """What a pass does besides the plain softmax of the head's product.

    Attributes:
        transform: the map from the head's product to the model's logits.
        needs_lse: token-wise terms read each row's log-sum-exp (the column pass then
            outputs it, and its mean logit, as two more columns).
        needs_mean: token-wise terms read each row's mean logit.
        token_weights: (n,) a factor per scored row for the token pass, or None.
        stats: filled with each scored row's entropy and argmax hit, or None.
    """

    transform: LogitTransform = LogitTransform()
    needs_lse: bool = False
    needs_mean: bool = False
    token_weights: Tensor | None = None
    stats: TokenStats | None = None
    use_triton: bool = False  # the plain passes as `kernels`' Triton programs


class TokenLossFunction(torch.autograd.Function):
    """scale · Σ_t w_t · f(t) over the scored rows, its gradient formed in the forward.

    Inputs: labels (n,), per_token_loss f: TokenInputs of c rows -> (c,), scale,
    chunk_rows, index (n,) of the scored rows among the parts' N (None: all N = n, in
    order), options (`PassOptions`), bias (V,) or None, then the parts h_1 (N, d_1),
    W_1 (V, d_1), h_2, W_2, ...
    Output: a 0-dim tensor. The scale (1 / tokens for a mean) is applied inside, so the
    upstream gradient is usually 1 and the gradient buffers are handed over uncopied.
    With upstream gradients g of log p_t(y_t), l of lse_t and m of the mean logit, the
    logit gradient is dz_t = g · onehot(y_t) + (l − g) · p_t + m / V, times the
    transform's derivative.
    """

    @staticmethod
    def forward(ctx, labels, per_token_loss, scale, chunk_rows, index, options, bias, *parts):
        hiddens, weights = _split_parts(parts)
        dtype = engine.accumulation_dtype(bias, *parts)
        logsumexp = engine._kernel(engine._logsumexp, labels.device)
        scaled_softmax_ = engine._kernel(engine._scaled_softmax_, labels.device)
        sink = engine._GradientSink(hiddens, weights, bias, ctx.needs_input_grad[6:])
        wants_grad = any(ctx.needs_input_grad[6:])
        transform, token_weights = options.transform, options.token_weights
        total = torch.zeros((), dtype=dtype, device=labels.device)
        for rows, picked in engine._chunks(labels.shape[0], chunk_rows, index):
            chunk = engine._take(hiddens, picked)
            if isinstance(per_token_loss, kernels.TokenTerms):
                # One kernel: the loss terms, and the logit gradient over the logits.
                logits = engine.chunk_logits(chunk, weights, bias, dtype)
                grad_scale = scale if wants_grad else None
                losses, _ = kernels.token_loss_pass_(
                    logits, labels[rows], per_token_loss, grad_scale=grad_scale
                )
                total += losses.sum()
                if wants_grad:
                    sink.add(logits, chunk, picked)
                del logits
                continue
            logits = transform.apply_(engine.chunk_logits(chunk, weights, bias, dtype), dtype)
            lse = logsumexp(logits, dtype)
            target = labels[rows, None]
            label_logit = logits.gather(1, target).squeeze(1).to(dtype)
            mean = logits.sum(1, dtype=dtype) / logits.shape[1] if options.needs_mean else None
            if options.stats is not None:
                options.stats.add(rows, logits, lse)
            row_weight = 1.0 if token_weights is None else token_weights[rows]
            leaves = [label_logit - lse, lse if options.needs_lse else None, mean]
            if not wants_grad:
                total += (per_token_loss(TokenInputs(*leaves)) * row_weight).sum()
            else:
                with torch.enable_grad():
                    leaves = [x if x is None else x.detach().requires_grad_() for x in leaves]
                    loss = (per_token_loss(TokenInputs(*leaves)) * row_weight).sum()
                    used = [x for x in leaves if x is not None]
                    grads = iter(torch.autograd.grad(loss, used, allow_unused=True))
                    g, g_lse, g_mean = (
                        None if x is None else _or_zeros(next(grads), x) * scale for x in leaves
                    )
                total += loss.detach()
                coef = -g if g_lse is None else g_lse - g
                shift = None if g_mean is None else g_mean / logits.shape[1]
                transform.softmax_grad_(logits, lse, coef, shift, scaled_softmax_)
                g = g * transform.factor(label_logit)
                logits.scatter_add_(1, target, g[:, None].to(logits.dtype))
                sink.add(logits, chunk, picked)
            del logits  # else it holds this chunk's buffer while the next one is made
        ctx.save_for_backward(*(g for g in sink.grads() if g is not None))
        ctx.present = [g is not None for g in sink.grads()]
        return total * scale

    @staticmethod
    def backward(ctx, grad_total):
        _refuse_double_backward()
        try:
            saved = iter(ctx.saved_tensors)
        except RuntimeError as err:  # autograd's version check
            raise RuntimeError(
                "a fused token-wise loss hands autograd its gradient buffers uncopied, so a "
                "further backward through the same loss (retain_graph=True) fails once those "
                "gradients have changed in place (accumulated into, or edited): compute the "
                "loss again for each backward"
            ) from err
        grads = [next(saved) if present else None for present in ctx.present]
        # With an upstream gradient of 1 autograd adopts the buffers as .grad; scaling
        # them would copy each one, a (V, d) copy for a trainable head.
        if not torch.equal(grad_total, torch.ones_like(grad_total)):
            grads = [g * grad_total if g is not None else None for g in grads]
        return None, None, None, None, None, None, *grads


def _or_zeros(grad: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if grad is None else grad


class HeadColumnsFunction(torch.autograd.Function):
    """Per-row log-probabilities of shared columns, in bounded memory.

    Inputs: columns (k,) long, with_rest, chunk_rows, index (n,) of the scored rows among
    the parts' N (None: all N = n, in order), options (`PassOptions`), bias (V,) or None,
    then the parts h_1 (N, d_1), W_1 (V, d_1), h_2, W_2, ...
    Output: (n, k) log p_t(c) for the classes c in `columns`, in the accumulation dtype;
    with `with_rest`, (n, k + 1), the last column log Σ_{c ∉ columns} p_t(c), the rest of
    the vocabulary's probability, from its own log-sum-exp (1 − Σ_c p_t(c) would cancel);
    with `options.needs_lse`, two more columns: lse_t and the mean logit Σ_v z_tv / V.
    Its backward, for an upstream G (n, k), forms dz_t = scatter(G_t) − p_t · Σ_c G_tc; the
    rest's upstream g adds g · (exp(z − lse_rest) off the columns − p_t), the lse's l adds
    l · p_t and the mean's m adds m / V; all times the transform's derivative.
    """

    @staticmethod
    def forward(ctx, columns, with_rest, chunk_rows, index, options, bias, *parts):
        hiddens, weights = _split_parts(parts)
        dtype = engine.accumulation_dtype(bias, *parts)
        logsumexp = engine._kernel(engine._logsumexp, columns.device)
        n = hiddens[0].shape[0] if index is None else index.shape[0]
        k = columns.shape[0]
        extras = 2 if options.needs_lse else 0
        lse = torch.empty(n, dtype=dtype, device=columns.device)
        rest_lse = torch.empty(n, dtype=dtype, device=columns.device) if with_rest else None
        logp = torch.empty(n, k + with_rest + extras, dtype=dtype, device=columns.device)
        for rows, picked in engine._chunks(n, chunk_rows, index):
            logits = engine.chunk_logits(engine._take(hiddens, picked), weights, bias, dtype)
            logits = options.transform.apply_(logits, dtype)
            at_columns = logits.index_select(1, columns).to(dtype)
            if options.stats is not None:
                options.stats.add(rows, logits)
            if extras:
                logp[rows, -1] = logits.sum(1, dtype=dtype) / logits.shape[1]
            if options.use_triton:
                # One kernel reads the logits once for both log-sum-exps.
                if with_rest:
                    in_columns = torch.zeros(
                        logits.shape[1], dtype=torch.bool, device=logits.device
                    )
                    in_columns[columns] = True
                    lse[rows], rest_lse[rows] = kernels.row_logsumexp(logits, exclude=in_columns)
                    logp[rows, k] = rest_lse[rows] - lse[rows]
                else:
                    lse[rows] = kernels.row_logsumexp(logits)
            # The backward recomputes the logits: their log-sum-exp may consume them.
            elif with_rest:
                logits.index_fill_(1, columns, float("-inf"))
                rest_lse[rows] = engine.consuming_logsumexp(logits, dtype, logsumexp)
                # The whole vocabulary's from its two parts: a sum, nothing cancels.
                whole = torch.logaddexp(rest_lse[rows], torch.logsumexp(at_columns, dim=1))
                lse[rows] = whole
                logp[rows, k] = rest_lse[rows] - whole
            else:
                lse[rows] = engine.consuming_logsumexp(logits, dtype, logsumexp)
            logp[rows, :k] = at_columns - lse[rows, None]
            del logits  # else it holds this chunk's buffer while the next one is made
        if extras:
            logp[:, -2] = lse
        # rest_lse is kept as is, not rebuilt from logp + lse, which loses its low digits
        # once the logits are huge. It is −inf where there is no rest (every class present,
        # or the others at −inf).
        ctx.chunk_rows, ctx.options = chunk_rows, options
        ctx.save_for_backward(columns, index, lse, rest_lse, bias, *parts)
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        _refuse_double_backward()
        # Run under autocast, its matmuls would change dtype (see `fused_linear_loss`).
        with torch.autocast(grad_logp.device.type, enabled=False):
            return HeadColumnsFunction._backward(ctx, grad_logp)

    @staticmethod
    def _backward(ctx, grad_logp):
        columns, index, lse, rest_lse, bias, *parts = ctx.saved_tensors
        hiddens, weights = _split_parts(parts)
        transform = ctx.options.transform
        if ctx.options.use_triton:
            scaled_softmax_ = kernels.scaled_softmax_
        else:
            scaled_softmax_ = engine._kernel(engine._scaled_softmax_, lse.device)
        if rest_lse is not None:
            # The exponent's origin off the columns: rest_lse, or 0 where there is no rest
            # (z is −inf there, so exp(z − 0) = 0 where exp(z − rest_lse) would be NaN).
            has_rest = rest_lse > float("-inf")
            rest_origin = torch.where(has_rest, rest_lse, 0.0)
        sink = engine._GradientSink(hiddens, weights, bias, ctx.needs_input_grad[5:])
        k = columns.shape[0]
        with_rest = rest_lse is not None
        for rows, picked in engine._chunks(lse.shape[0], ctx.chunk_rows, index):
            chunk = engine._take(hiddens, picked)
            logits = engine.chunk_logits(chunk, weights, bias, lse.dtype)
            logits = transform.apply_(logits, lse.dtype)
            g = grad_logp[rows]
            scale = -g[:, : k + with_rest].sum(1)
            shift = None
            if ctx.options.needs_lse:
                scale = scale + g[:, -2]
                shift = g[:, -1] / logits.shape[1]
            at_columns = logits.index_select(1, columns).to(lse.dtype)
            if rest_lse is None:
                columns_grad = g[:, :k]
                transform.softmax_grad_(logits, lse[rows], scale, shift, scaled_softmax_)
                columns_grad = columns_grad * transform.factor(at_columns)
                logits.index_add_(1, columns, columns_grad.to(logits.dtype))
            else:
                # Off the columns dz = scale · p + g_rest · exp(z − rest_lse), and there
                # p = exp(z − rest_lse) · exp(rest_lse − lse), a factor ≤ 1 per row: so dz is
                # one scaled exponential of z − rest_lse. The columns' entries (where it
                # may overflow) are written whole after.
                p = (at_columns - lse[rows, None]).exp()
                to_p = torch.where(has_rest[rows], (rest_lse[rows] - lse[rows]).exp(), 0.0)
                coef = scale * to_p + g[:, k]
                transform.softmax_grad_(logits, rest_origin[rows], coef, shift, scaled_softmax_)
                columns_grad = g[:, :k] + p * scale[:, None]
                if shift is not None:
                    columns_grad = columns_grad + shift[:, None]
                columns_grad = columns_grad * transform.factor(at_columns)
                logits.index_copy_(1, columns, columns_grad.to(logits.dtype))
            sink.add(logits, chunk, picked)
            del logits  # else it holds this chunk's buffer while the next one is made
        return None, None, None, None, None, *sink.grads()


def token_loss(
    labels: Tensor,
    per_token_loss: Callable[[TokenInputs], Tensor],
    scale: float,
    chunk_rows: int,
    hiddens: Sequence[Tensor],
    weights: Sequence[Tensor],
    bias: Tensor | None,
    index: Tensor | None = None,
    options: PassOptions = PassOptions(),
) -> Tensor:
    """scale · Σ_t w_t · f(t) over the rows `index` of the parts (see
    `TokenLossFunction`); labels (n,) follow `index` (n,), or all rows when it is None."""
    parts = _interleave(hiddens, weights)
    if not torch.is_grad_enabled():
        # Under no_grad / inference_mode the forward would still form the gradients its
        # inputs ask for (and inference_mode forbids it): detached, it forms none.
        parts = [p.detach() for p in parts]
        bias = bias.detach() if bias is not None else None
    return TokenLossFunction.apply(
        labels, per_token_loss, scale, chunk_rows, index, options, bias, *parts
    )


def column_log_probs(
    columns: Tensor,
    chunk_rows: int,
    hiddens: Sequence[Tensor],
    weights: Sequence[Tensor],
    bias: Tensor | None,
    index: Tensor | None = None,
    with_rest: bool = False,
    options: PassOptions = PassOptions(),
) -> Tensor:
    """(n, k) log p_t(c) of the rows `index` (n,) of the parts (all rows when None) for the
    classes c in `columns` (k,); with `with_rest`, (n, k + 1), the last column the log of
    the probability of all other classes; with `options.needs_lse` two more, lse_t and the
    mean logit (see `HeadColumnsFunction`)."""
    parts = _interleave(hiddens, weights)
    return HeadColumnsFunction.apply(columns, with_rest, chunk_rows, index, options, bias, *parts)


def _interleave(hiddens: Sequence[Tensor], weights: Sequence[Tensor]) -> list[Tensor]:
    """[h_1, W_1, h_2, W_2, ...], the flat argument list of the autograd functions."""
    return [t for pair in zip(hiddens, weights, strict=True) for t in pair]
