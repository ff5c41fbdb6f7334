"""How many rows per chunk: the auto-tuner behind `chunk_size="auto"`.

One chunk's transient memory is about `bytes_per_row = bytes_per_logit · V + 2 · d ·
itemsize` (its logits, plus its gathered hidden rows and their gradient, which share one
buffer unless a half head is upcast: the second d · itemsize is a margin). The logit
gradient is written over the logits, so per logit that is, on a CPU: the logits in the
accumulation dtype (half inputs are upcast) and one temporary of that dtype (the
log-sum-exp's): 8 bytes, 16 for float64. On CUDA, compiled: the half logits alone, the
fused kernels keeping their float32 values in registers, plus, on the recompute path, a
margin of 2 bytes for its (rows, present classes) tensors; but a head of several parts
(LoRA) or with a bias sums float32 logits beside half products: 8 bytes. Eager
(QSEG_COMPILE=0): the logits, their float32 upcast and the temporary, 10 bytes for bf16.
`benchmarks/autotune.py` checks these estimates against measured peaks.

The budget comes from the memory free on the device (`default_budget`). Token-wise
mixtures are further held to chunks no larger than the hidden-state gradient they produce
anyway, (N, d) for the N positions given, scored or not, as fused cross-entropy kernels
hold theirs, but to no fewer than 128 rows (fewer would re-read the head for little
gain): at Llama-3's head and 8192 positions that is 240 rows, level with Liger-Kernel's
256-row chunk. Region losses take the whole budget: their backward walks
the head a second time, so larger chunks pay off more.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import asdict, dataclass

import torch

from .engine import upcasts_half_products, uses_compiled_kernels
from .registry import normalize_losses, split_by_kind

MiB = 1 << 20
# A cap on one chunk's bytes: larger chunks than this bought little time on a GPU in the
# chunk-size sweep (benchmarks/README.md) and cost memory a long context needs.
CUDA_BUDGET_CAP = 384 * MiB
CPU_BUDGET_CAP = 128 * MiB
# Row counts are rounded down to a multiple of this (when larger) to keep matmuls aligned.
ROW_ALIGNMENT = 16
# Token-wise chunks get at least this many rows: fewer would re-read the head for little gain.
MIN_TOKEN_ROWS = 128


@dataclass(frozen=True)
class ChunkPlan:
    """The tuner's decision, for logs and benchmarks."""

    rows: int
    bytes_per_row: int
    estimated_bytes: int
    budget_bytes: int
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def bytes_per_logit(
    dtype: torch.dtype, device: torch.device, token_path: bool = False, plain_head: bool = True
) -> int:
    """Transient bytes per (row, vocabulary entry) of one chunk, for inputs of `dtype`, on
    the fused token-wise path or (default) the recompute path, for a head of one weight
    without bias (`plain_head`) or not."""
    accumulate = 8 if dtype == torch.float64 else 4
    native = torch.finfo(dtype).bits // 8
    if upcasts_half_products(device):
        return 2 * accumulate
    if uses_compiled_kernels(device):
        logits = native if plain_head else 2 * accumulate
        return logits if token_path else logits + 2
    return native + accumulate + (accumulate if native < accumulate else 0)


def bytes_per_row(
    vocab: int,
    hidden_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    token_path: bool = False,
    plain_head: bool = True,
) -> int:
    """Transient bytes per row of one chunk: its logits, gathered hidden row and gradient."""
    per_logit = bytes_per_logit(dtype, device, token_path, plain_head)
    return per_logit * vocab + 2 * hidden_dim * dtype.itemsize


def default_budget(device: torch.device) -> tuple[int, str]:
    """A byte budget for one chunk from the memory free on `device`, with the reason."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        allocated = torch.cuda.memory_allocated(device)
        # The caching allocator reuses its reserved-but-unused blocks; a per-process cap
        # (set_per_process_memory_fraction) is invisible to mem_get_info.
        index = device.index if device.index is not None else torch.cuda.current_device()
        allowed = torch.cuda.get_per_process_memory_fraction(index) * total
        cached = torch.cuda.memory_reserved(device) - allocated
        free = int(min(free + cached, allowed - allocated))
        budget = min(free // 8, CUDA_BUDGET_CAP)
        return budget, f"1/8 of {free / MiB:.0f} MiB free to this process, capped at 384 MiB"
    available = _available_ram()
    budget = min(available // 16, CPU_BUDGET_CAP)
    return budget, f"1/16 of {available / MiB:.0f} MiB available RAM, capped at 128 MiB"


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def plan_chunks(
    n_tokens: int,
    vocab: int,
    hidden_dim: int,
    dtype: torch.dtype,
    losses: object = None,
    *,
    device: torch.device | str = "cpu",
    chunk_memory: int | None = None,
    positions: int | None = None,
    plain_head: bool = True,
) -> ChunkPlan:
    """Pick rows per chunk so that one chunk's transient memory fits the budget.

    Args:
        n_tokens: valid tokens to score; a chunk never has more rows.
        vocab: V. hidden_dim: d.
        dtype: dtype of the hidden states and head.
        losses: the mixture (any form `normalize_losses` takes) or None. A token-wise
            mixture takes the fused path, whose default budget is also held to the hidden
            states' size (see the module docstring); None is treated as a region mixture.
        device: where the loss runs; sets the default budget.
        chunk_memory: byte budget for one chunk, taken as given; None takes
            `default_budget(device)`.
        positions: N, the rows of hidden states given (scored or not; None: n_tokens).
            A token-wise mixture's default budget is at most their gradient's bytes
            (or 128 rows, when that is more).
        plain_head: the head is one weight without bias; a LoRA head's several parts or
            a bias make CUDA logits float32, which costs more per row.

    Raises:
        ValueError: the budget cannot hold even one row, or positions < n_tokens.
    """
    device = torch.device(device)
    positions = n_tokens if positions is None else positions
    integral = isinstance(positions, numbers.Integral) and not isinstance(positions, bool)
    if not integral or positions < n_tokens:
        raise ValueError(
            f"positions must be an int of at least n_tokens={n_tokens}; got {positions!r}"
        )
    positions = int(positions)
    token_path = losses is not None and _token_only(losses)
    per_row = bytes_per_row(vocab, hidden_dim, dtype, device, token_path, plain_head)
    if chunk_memory is None:
        budget, why = default_budget(device)
        if token_path:
            gradient = max(positions * hidden_dim * dtype.itemsize, MIN_TOKEN_ROWS * per_row)
            if gradient < budget:
                budget = gradient
                why = (
                    f"token-wise: at most the {positions}x{hidden_dim} hidden-state "
                    f"gradient's bytes (at least {MIN_TOKEN_ROWS} rows), within {why}"
                )
    else:
        real = isinstance(chunk_memory, numbers.Real) and not isinstance(chunk_memory, bool)
        if not real or not math.isfinite(chunk_memory) or chunk_memory < 1:
            raise ValueError(
                f"chunk_memory must be a positive number of bytes; got {chunk_memory!r}"
            )
        budget, why = int(chunk_memory), "chunk_memory given"
    if per_row > budget:
        raise ValueError(
            f"chunk_memory={budget} bytes cannot hold one row of logits ({per_row} bytes at "
            f"V={vocab}, d={hidden_dim}, {dtype}); allow at least {per_row} bytes"
        )
    rows = min(budget // per_row, max(n_tokens, 1))
    if rows > ROW_ALIGNMENT:
        rows -= rows % ROW_ALIGNMENT
    path = "fused token-wise" if token_path else "recompute"
    reason = (
        f"{path} path; budget {budget / MiB:.1f} MiB ({why}); {per_row / MiB:.2f} MiB per row "
        f"(V={vocab}, d={hidden_dim}, {str(dtype).removeprefix('torch.')}) -> {rows} rows"
    )
    return ChunkPlan(rows, per_row, rows * per_row, budget, reason)


def _token_only(losses: object) -> bool:
    return not split_by_kind(normalize_losses(losses))[1]
