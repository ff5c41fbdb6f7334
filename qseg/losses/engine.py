"""The chunked engine: the only code that touches the whole vocabulary.

The logits of a row chunk are z = Σ_i h_i W_iᵀ + b, a sum over "parts" (h_i, W_i) so that
a LoRA head (W₀ plus the low-rank B·A) is computed without ever forming W₀ + B·A:
its parts are (h, W₀) and (s · dropout(h) Aᵀ, B). Every function here walks the scored
rows in chunks, so at most (chunk_rows, V) logits exist at any time. The parts hold every
position (N rows); `index` (n,) names the n scored ones, so that neither the hidden
states nor their gradient are ever copied whole: a chunk gathers its own rows, and its
hidden-state gradient is written straight into the (N, d) result.

Two autograd functions:
- `TokenLossFunction`, for mixtures of token-wise losses only. Each token's gradient
  depends on that token alone, so it is formed during the forward, chunk by chunk, as
  Liger-Kernel does for cross-entropy; the backward only scales it.
- `HeadColumnsFunction`, for everything else. The forward returns each row's
  log-probabilities of a small set of columns (the classes present in the batch); the
  loss is then ordinary autograd on that small tensor. The backward recomputes each
  chunk's softmax to turn the small upstream gradient into the logit gradient
  dz = scatter(g) − p · Σg, never storing it.
Both write a chunk's logit gradient over its logits, in place: one (chunk, V) buffer each.
Each has two implementations of its pass over a chunk's logits: torch operations (compiled
on CUDA), and the fused Triton kernels of `kernels`, one launch per chunk; the caller
picks (`kernels.uses_triton`).

Precision: logits, log-sum-exps and logit gradients are float32 (float64 for float64
inputs). Off CUDA, products with a half-precision head are formed in float32 from upcast
blocks of its rows, so half inputs give what their float32 upcast would. On CUDA the half
matmul is kept (float32 accumulation, half output, upcast after), as Liger-Kernel does: an
exact float32 product there would take a float32 logits buffer plus a half copy of its
gradient per chunk, three times the bytes per logit and so a third of the rows per chunk.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from . import kernels

# A chunk's rows among the parts' N: a slice when every row is scored, else (chunk,) indices.
Rows = slice | Tensor


def accumulation_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 when any input is float64, else float32 (half inputs are upcast)."""
    has_double = any(t is not None and t.dtype == torch.float64 for t in tensors)
    return torch.float64 if has_double else torch.float32


def upcasts_half_products(device: torch.device) -> bool:
    """Whether products with half-precision head parts on `device` are formed in float32
    from upcast blocks: everywhere but CUDA (see the module docstring)."""
    return device.type != "cuda"


def upcasts_half(weight: Tensor) -> bool:
    """Whether products with this head part are formed in float32 from upcast blocks."""
    return weight.dtype in (torch.float16, torch.bfloat16) and upcasts_half_products(weight.device)


# Rows of a half head upcast at a time: a 4 MiB float32 block, whatever the vocabulary.
UPCAST_BLOCK_BYTES = 4 << 20


def _head_blocks(weight: Tensor) -> Iterator[slice]:
    rows = max(1, UPCAST_BLOCK_BYTES // (4 * weight.shape[1]))
    for start in range(0, weight.shape[0], rows):
        yield slice(start, start + rows)


def _times_head_t(h: Tensor, w: Tensor, dtype: torch.dtype) -> Tensor:
    """h (chunk, d) @ w (V, d)ᵀ: in the inputs' dtype, or in `dtype` from upcast blocks."""
    if not upcasts_half(w):
        return h @ w.T
    h = h.to(dtype)
    out = torch.empty(h.shape[0], w.shape[0], dtype=dtype, device=h.device)
    for block in _head_blocks(w):
        torch.mm(h, w[block].to(dtype).T, out=out[:, block])
    return out


def _times_head(dz: Tensor, w: Tensor) -> Tensor:
    """dz (chunk, V) @ w (V, d) in dz's dtype, from upcast blocks of a half w."""
    out = dz.new_zeros(dz.shape[0], w.shape[1])
    for block in _head_blocks(w):
        out.addmm_(dz[:, block], w[block].to(dz.dtype))
    return out


def chunk_logits(
    chunk_hiddens: Sequence[Tensor],
    weights: Sequence[Tensor],
    bias: Tensor | None,
    dtype: torch.dtype,
) -> Tensor:
    """(chunk, V) logits from the chunk's parts h_i (chunk, d_i). A lone half part on CUDA
    without bias stays in its matmul's dtype (the upcast happens inside the elementwise
    kernels); everything else is in `dtype`."""
    logits = None
    for h, w in zip(chunk_hiddens, weights, strict=True):
        part = _times_head_t(h, w, dtype)
        logits = part if logits is None else logits.to(dtype).add_(part)
    if bias is not None:
        logits = logits.to(dtype).add_(bias)
    return logits


def _chunks(n: int, chunk_rows: int, index: Tensor | None) -> Iterator[tuple[slice, Rows]]:
    """(rows among the n scored, the same rows among the parts' N) for each chunk."""
    for start in range(0, n, chunk_rows):
        rows = slice(start, start + chunk_rows)
        yield rows, (rows if index is None else index[rows])


def _take(hiddens: Sequence[Tensor], rows: Rows) -> list[Tensor]:
    """Each part's (chunk, d_i) rows: views for a slice, small gathers for indices."""
    if isinstance(rows, slice):
        return [h[rows] for h in hiddens]
    return [h.index_select(0, rows) for h in hiddens]


def _logsumexp(logits: Tensor, dtype: torch.dtype) -> Tensor:
    """(chunk,) log Σ_v exp(z_v), computed in `dtype`."""
    return torch.logsumexp(logits.to(dtype), dim=1)


def _consuming_logsumexp(logits: Tensor, dtype: torch.dtype, logsumexp: Callable) -> Tensor:
    """(chunk,) log Σ_v exp(z_v), −inf for a row of −inf only; it may overwrite the logits.

    Logits already in `dtype` are exponentiated in place: torch.logsumexp would make a
    (chunk, V) temporary. Half logits (CUDA) go through `logsumexp`, the kernel that reads
    them in `dtype`."""
    if logits.dtype != dtype:
        return logsumexp(logits, dtype)
    top = logits.amax(1)
    top = torch.where(top > float("-inf"), top, 0.0)  # a row of −inf: exp(−inf − 0) sums to 0
    return logits.sub_(top[:, None]).exp_().sum(1).log_().add_(top)


def _scaled_softmax_(logits: Tensor, lse: Tensor, scale: Tensor) -> None:
    """logits ← scale_t · p_t, in place: the softmax part of every logit gradient.

    The softmax is computed in lse's dtype; a float32 buffer is overwritten with no
    temporary, a half one through one float32 temporary (none when compiled)."""
    p = logits.to(lse.dtype)
    logits.copy_(p.sub_(lse[:, None]).exp_().mul_(scale[:, None]))


# On CUDA `_logsumexp` and `_scaled_softmax_` run as compiled (fused) kernels: each then
# reads the half-precision logits once instead of making several float32 passes, and the
# in-place one writes its result over its input with no temporary.
# QSEG_COMPILE=0 turns this off; a failed compilation falls back to eager, with a warning.
_COMPILED: dict[Callable, Callable] = {}
_compile_failed = False


def uses_compiled_kernels(device: torch.device) -> bool:
    """Whether the elementwise passes on `device` run compiled."""
    return (
        device.type == "cuda"
        and os.environ.get("QSEG_COMPILE", "1") != "0"
        and not (_compile_failed)
    )


def _kernel(eager: Callable, device: torch.device) -> Callable:
    if not uses_compiled_kernels(device):
        return eager
    if eager not in _COMPILED:
        _COMPILED[eager] = torch.compile(eager, dynamic=True)
    compiled = _COMPILED[eager]

    def run(*args):
        global _compile_failed
        # A compiler failure surfaces before the kernel runs, so the in-place kernel's
        # eager retry below still sees its inputs untouched.
        try:
            return compiled(*args)
        except torch.OutOfMemoryError:
            raise  # the eager kernel would need the memory too
        except Exception as error:  # noqa: BLE001 - any compiler failure means: run eager
            _compile_failed = True
            warnings.warn(
                f"qseg: torch.compile failed ({error!r}); using eager kernels", stacklevel=2
            )
            return eager(*args)

    return run


class _GradientSink:
    """Accumulates dh_i, dW_i and db from logit gradients dz, chunk by chunk.

    dh_i is (N, d_i) like the part it belongs to; rows that are never scored stay zero."""

    def __init__(
        self,
        hiddens: Sequence[Tensor],
        weights: Sequence[Tensor],
        bias: Tensor | None,
        needs: Sequence[bool],
    ):
        # `needs` follows the inputs: bias, then (h_1, W_1, h_2, W_2, ...).
        self.weights = weights
        self.bias = torch.zeros_like(bias) if bias is not None and needs[0] else None
        self.h = [
            torch.zeros(h.shape, dtype=h.dtype, device=h.device) if n else None
            for h, n in zip(hiddens, needs[1::2], strict=True)
        ]
        # An upcast half weight's gradient is summed over the chunks in float32.
        self.w = [
            torch.zeros(w.shape, dtype=_sum_dtype(w), device=w.device) if n else None
            for w, n in zip(weights, needs[2::2], strict=True)
        ]

    def add(self, dz: Tensor, chunk_hiddens: Sequence[Tensor], rows: Rows) -> None:
        """Add one chunk's (chunk, V) logit gradient; `chunk_hiddens` are its parts' rows,
        views for a slice of rows, else the chunk's own gathered copies, which this spends."""
        casts = {dz.dtype: dz}
        for h, w, dh, dw in zip(chunk_hiddens, self.weights, self.h, self.w, strict=True):
            upcast = upcasts_half(w)
            if not upcast and w.dtype not in casts:
                casts[w.dtype] = dz.to(w.dtype)
            dz_w = dz if upcast else casts[w.dtype]
            if dw is not None:  # dz is float64 beside a float32 sum where a float64 bias is
                dw.addmm_(dz_w.T.to(dw.dtype), h.to(dw.dtype))
            if dh is None:
                continue
            if upcast:
                _write_rows(dh, rows, _times_head(dz, w))
            elif isinstance(rows, slice):
                torch.mm(dz_w, w, out=dh[rows])
            else:
                # dW has used the gathered rows: their buffer takes their gradient.
                dh.index_copy_(0, rows, torch.mm(dz_w, w, out=h))
        if self.bias is not None:
            self.bias += dz.sum(0, dtype=self.bias.dtype)

    def grads(self) -> list[Tensor | None]:
        """[db, dh_1, dW_1, dh_2, dW_2, ...], the order of the inputs."""
        w = [g if g is None else g.to(p.dtype) for g, p in zip(self.w, self.weights, strict=True)]
        pairs = [g for pair in zip(self.h, w, strict=True) for g in pair]
        return [self.bias, *pairs]


def _sum_dtype(weight: Tensor) -> torch.dtype:
    return torch.float32 if upcasts_half(weight) else weight.dtype


def _write_rows(dst: Tensor, rows: Rows, src: Tensor) -> None:
    if isinstance(rows, slice):
        dst[rows] = src
    else:
        dst.index_copy_(0, rows, src.to(dst.dtype))


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


class TokenLossFunction(torch.autograd.Function):
    """scale · Σ_t f(log p_t(y_t)) over the scored rows, its gradient formed in the forward.

    Inputs: labels (n,), per_token_loss f: (c,) -> (c,), or the same mixture as
    `kernels.TokenTerms` to run each chunk's pass as one Triton kernel, scale, chunk_rows,
    index (n,) of the scored rows among the parts' N (None: all N = n, in order), bias (V,)
    or None, then the parts h_1 (N, d_1), W_1 (V, d_1), h_2, W_2, ...
    Output: a 0-dim tensor. The scale (1 / tokens for a mean) is applied inside, so the
    upstream gradient is usually 1 and the gradient buffers are handed over uncopied.
    """

    @staticmethod
    def forward(ctx, labels, per_token_loss, scale, chunk_rows, index, bias, *parts):
        hiddens, weights = _split_parts(parts)
        dtype = accumulation_dtype(bias, *parts)
        logsumexp = _kernel(_logsumexp, labels.device)
        scaled_softmax_ = _kernel(_scaled_softmax_, labels.device)
        sink = _GradientSink(hiddens, weights, bias, ctx.needs_input_grad[5:])
        wants_grad = any(ctx.needs_input_grad[5:])
        total = torch.zeros((), dtype=dtype, device=labels.device)
        for rows, picked in _chunks(labels.shape[0], chunk_rows, index):
            chunk = _take(hiddens, picked)
            logits = chunk_logits(chunk, weights, bias, dtype)
            if isinstance(per_token_loss, kernels.TokenTerms):
                grad_scale = scale if wants_grad else None
                losses, _ = kernels.token_loss_pass_(
                    logits, labels[rows], per_token_loss, grad_scale=grad_scale
                )
                total += losses.sum()
                if wants_grad:
                    sink.add(logits, chunk, picked)
                del logits
                continue
            lse = logsumexp(logits, dtype)
            target = labels[rows, None]
            logp = logits.gather(1, target).squeeze(1).to(dtype) - lse
            if not wants_grad:
                total += per_token_loss(logp).sum()
            else:
                with torch.enable_grad():
                    logp = logp.detach().requires_grad_()
                    loss = per_token_loss(logp).sum()
                    (g,) = torch.autograd.grad(loss, logp)
                    g = g * scale
                total += loss.detach()
                # d f / d z = g · (onehot(y) − p), written over the logits
                scaled_softmax_(logits, lse, -g)
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
        return None, None, None, None, None, *grads


class HeadColumnsFunction(torch.autograd.Function):
    """Per-row log-probabilities of shared columns, in bounded memory.

    Inputs: columns (k,) long, with_rest, use_triton (the passes over a chunk's logits as
    Triton kernels), chunk_rows, index (n,) of the scored rows among the parts' N (None:
    all N = n, in order), bias (V,) or None, then the parts h_1 (N, d_1), W_1 (V, d_1), h_2,
    W_2, ...
    Output: (n, k) log p_t(c) for the classes c in `columns`, in the accumulation dtype;
    with `with_rest`, (n, k + 1), the last column log Σ_{c ∉ columns} p_t(c), the rest of
    the vocabulary's probability, from its own log-sum-exp (1 − Σ_c p_t(c) would cancel).
    Its backward, for an upstream G (n, k), forms dz_t = scatter(G_t) − p_t · Σ_c G_tc; the
    rest's upstream g adds g · (exp(z − lse_rest) off the columns − p_t).
    """

    @staticmethod
    def forward(ctx, columns, with_rest, use_triton, chunk_rows, index, bias, *parts):
        hiddens, weights = _split_parts(parts)
        dtype = accumulation_dtype(bias, *parts)
        logsumexp = _kernel(_logsumexp, columns.device)
        n = hiddens[0].shape[0] if index is None else index.shape[0]
        k = columns.shape[0]
        lse = torch.empty(n, dtype=dtype, device=columns.device)
        rest_lse = torch.empty(n, dtype=dtype, device=columns.device) if with_rest else None
        logp = torch.empty(n, k + with_rest, dtype=dtype, device=columns.device)
        if use_triton and with_rest:
            in_columns = torch.zeros(weights[0].shape[0], dtype=torch.bool, device=columns.device)
            in_columns[columns] = True
        for rows, picked in _chunks(n, chunk_rows, index):
            logits = chunk_logits(_take(hiddens, picked), weights, bias, dtype)
            at_columns = logits.index_select(1, columns).to(dtype)
            if use_triton:
                # One kernel reads the logits once for both log-sum-exps.
                if with_rest:
                    lse[rows], rest_lse[rows] = kernels.row_logsumexp(logits, exclude=in_columns)
                    logp[rows, k] = rest_lse[rows] - lse[rows]
                else:
                    lse[rows] = kernels.row_logsumexp(logits)
            # The backward recomputes the logits: their log-sum-exp may consume them.
            elif with_rest:
                logits.index_fill_(1, columns, float("-inf"))
                rest_lse[rows] = _consuming_logsumexp(logits, dtype, logsumexp)
                # The whole vocabulary's from its two parts: a sum, nothing cancels.
                whole = torch.logaddexp(rest_lse[rows], torch.logsumexp(at_columns, dim=1))
                lse[rows] = whole
                logp[rows, k] = rest_lse[rows] - whole
            else:
                lse[rows] = _consuming_logsumexp(logits, dtype, logsumexp)
            logp[rows, :k] = at_columns - lse[rows, None]
            del logits  # else it holds this chunk's buffer while the next one is made
        # rest_lse is kept as is, not rebuilt from logp + lse, which loses its low digits
        # once the logits are huge. It is −inf where there is no rest (every class present,
        # or the others at −inf).
        ctx.chunk_rows = chunk_rows
        ctx.use_triton = use_triton
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
        if ctx.use_triton:
            scaled_softmax_ = kernels.scaled_softmax_
        else:
            scaled_softmax_ = _kernel(_scaled_softmax_, lse.device)
        if rest_lse is not None:
            # The exponent's origin off the columns: rest_lse, or 0 where there is no rest
            # (z is −inf there, so exp(z − 0) = 0 where exp(z − rest_lse) would be NaN).
            has_rest = rest_lse > float("-inf")
            rest_origin = torch.where(has_rest, rest_lse, 0.0)
        sink = _GradientSink(hiddens, weights, bias, ctx.needs_input_grad[5:])
        k = columns.shape[0]
        for rows, picked in _chunks(lse.shape[0], ctx.chunk_rows, index):
            chunk = _take(hiddens, picked)
            logits = chunk_logits(chunk, weights, bias, lse.dtype)
            g = grad_logp[rows]
            scale = -g.sum(1)
            if rest_lse is None:
                scaled_softmax_(logits, lse[rows], scale)
                logits.index_add_(1, columns, g.to(logits.dtype))
            else:
                # Off the columns dz = scale · p + g_rest · exp(z − rest_lse), and there
                # p = exp(z − rest_lse) · exp(rest_lse − lse), a factor ≤ 1 per row: so dz is
                # one scaled exponential of z − rest_lse. The columns' entries (where it
                # may overflow) are written whole after.
                p = (logits.index_select(1, columns).to(lse.dtype) - lse[rows, None]).exp()
                to_p = torch.where(has_rest[rows], (rest_lse[rows] - lse[rows]).exp(), 0.0)
                scaled_softmax_(logits, rest_origin[rows], scale * to_p + g[:, k])
                columns_grad = g[:, :k] + p * scale[:, None]
                logits.index_copy_(1, columns, columns_grad.to(logits.dtype))
            sink.add(logits, chunk, picked)
            del logits  # else it holds this chunk's buffer while the next one is made
        return None, None, None, None, None, *sink.grads()


def token_loss(
    labels: Tensor,
    per_token_loss: Callable[[Tensor], Tensor] | kernels.TokenTerms,
    scale: float,
    chunk_rows: int,
    hiddens: Sequence[Tensor],
    weights: Sequence[Tensor],
    bias: Tensor | None,
    index: Tensor | None = None,
) -> Tensor:
    """scale · Σ_t f(log p_t(y_t)) over the rows `index` of the parts (see
    `TokenLossFunction`; `kernels.TokenTerms` for f runs the Triton pass); labels (n,)
    follow `index` (n,), or all rows when it is None."""
    parts = _interleave(hiddens, weights)
    if not torch.is_grad_enabled():
        # Under no_grad / inference_mode the forward would still form the gradients its
        # inputs ask for (and inference_mode forbids it): detached, it forms none.
        parts = [p.detach() for p in parts]
        bias = bias.detach() if bias is not None else None
    return TokenLossFunction.apply(labels, per_token_loss, scale, chunk_rows, index, bias, *parts)


def column_log_probs(
    columns: Tensor,
    chunk_rows: int,
    hiddens: Sequence[Tensor],
    weights: Sequence[Tensor],
    bias: Tensor | None,
    index: Tensor | None = None,
    with_rest: bool = False,
    use_triton: bool = False,
) -> Tensor:
    """(n, k) log p_t(c) of the rows `index` (n,) of the parts (all rows when None) for the
    classes c in `columns` (k,); with `with_rest`, (n, k + 1), the last column the log of
    the probability of all other classes (see `HeadColumnsFunction`); `use_triton` runs
    the passes over each chunk's logits as Triton kernels."""
    parts = _interleave(hiddens, weights)
    return HeadColumnsFunction.apply(
        columns, with_rest, use_triton, chunk_rows, index, bias, *parts
    )


def _interleave(hiddens: Sequence[Tensor], weights: Sequence[Tensor]) -> list[Tensor]:
    """[h_1, W_1, h_2, W_2, ...], the flat argument list of the autograd functions."""
    return [t for pair in zip(hiddens, weights, strict=True) for t in pair]
