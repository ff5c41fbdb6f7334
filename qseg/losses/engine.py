"""The chunked engine: the only code that touches the whole vocabulary.

The logits of a row chunk are z = Σ_i h_i W_iᵀ + b, a sum over "parts" (h_i, W_i) so that
a LoRA head (W₀ plus the low-rank B·A) is computed without ever forming W₀ + B·A:
its parts are (h, W₀) and (s · dropout(h) Aᵀ, B). Every function here walks the scored
rows in chunks, so at most (chunk_rows, V) logits exist at any time. The parts hold every
position (N rows); `index` (n,) names the n scored ones, so that neither the hidden
states nor their gradient are ever copied whole: a chunk gathers its own rows, and its
hidden-state gradient is written straight into the (N, d) result.

The autograd functions built on it are in `qseg.losses.passes`. Both write a chunk's
logit gradient over its logits, in place: one (chunk, V) buffer each.

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

from .observe import notify, observing

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
    parts = [h.index_select(0, rows) for h in hiddens]
    if observing():
        notify("gather", rows=rows, buffer=parts[0])
    return parts


def _logsumexp(logits: Tensor, dtype: torch.dtype) -> Tensor:
    """(chunk,) log Σ_v exp(z_v), computed in `dtype`."""
    return torch.logsumexp(logits.to(dtype), dim=1)


def consuming_logsumexp(
    logits: Tensor, dtype: torch.dtype, logsumexp: Callable | None = None
) -> Tensor:
    """(chunk,) log Σ_v exp(z_v), −inf for a row of −inf only; it may overwrite the logits.

    Logits already in `dtype` are exponentiated in place: torch.logsumexp would make a
    (chunk, V) temporary. Half logits (CUDA) go through `logsumexp`, the kernel that reads
    them in `dtype`."""
    if logits.dtype != dtype:
        return (logsumexp or _logsumexp)(logits, dtype)
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
        return _observed(eager, compiled=False)
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

    return _observed(run, compiled=True, name=eager.__name__)


def _observed(kernel: Callable, compiled: bool, name: str | None = None) -> Callable:
    """`kernel`, telling observers that it ran."""
    if not observing():
        return kernel
    label = (name or kernel.__name__).strip("_")

    def run(*args):
        notify("kernel", name=label, compiled=compiled)
        return kernel(*args)

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
        if observing():
            notify("gradient", dz=dz, rows=rows)
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
        grads = [self.bias, *pairs]
        if observing():
            notify("grads", grads=grads)
        return grads


def _sum_dtype(weight: Tensor) -> torch.dtype:
    return torch.float32 if upcasts_half(weight) else weight.dtype


def _write_rows(dst: Tensor, rows: Rows, src: Tensor) -> None:
    if isinstance(rows, slice):
        dst[rows] = src
    else:
        dst.index_copy_(0, rows, src.to(dst.dtype))
