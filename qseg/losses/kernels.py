"""Fused Triton passes over a chunk's logits, one launch per chunk: the engine's loss pass.

Each function reads an (n, V) block of logits (float32, bfloat16 or float16), accumulates
in float32, and where it writes a gradient writes it over the logits, in place. The torch
passes in `engine` compute the same quantities and remain the fallback (float64, devices
without Triton).

The math the programs compute, gradients included, is written out in `triton_kernels`.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Columns per step of a program, and COLUMNS_PER_THREAD of them for each of its threads:
# with more per thread the token pass's widest variant spills registers to the stack on
# sm_90 (ptxas's resource usage). The interpreter runs block operations as numpy arrays,
# where smaller blocks cost nothing.
MAX_BLOCK = 8192
COLUMNS_PER_THREAD = 8
INTERPRETER_MAX_BLOCK = 1024


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """Whether Triton runs its programs in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available(device: torch.device | str) -> bool:
    """Whether the kernels here can run on `device`: CUDA with triton importable, or the
    CPU when Triton's interpreter is on (TRITON_INTERPRET=1, set before the first kernel
    of this process is defined)."""
    device = torch.device(device)
    if not _triton_importable():
        return False
    if device.type == "cuda":
        return not interpreting() and torch.cuda.is_available()
    return device.type == "cpu" and interpreting()


IMPLS = ("auto", "triton", "torch")


def uses_triton(impl: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a fused loss with option `impl` on `device` and accumulation `dtype` runs
    its passes over the logits as the Triton kernels here.

    "torch": never. "triton": always, or a ValueError saying why it cannot. "auto": on CUDA
    when `QSEG_TRITON=1` asks for the kernels, triton imports and the inputs are not
    float64 (the kernels accumulate in float32, and float64 inputs are promised float64);
    never on a CPU, where Triton has only its interpreter. The kernels are opt-in until
    `scripts/gpu_kernels.sh` has measured them on a GPU.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}")
    if impl == "torch":
        return False
    if impl == "triton":
        if dtype == torch.float64:
            raise ValueError(
                "impl='triton' computes in float32, and float64 inputs are computed in "
                "float64: use impl='torch' or 'auto' for them"
            )
        if not triton_available(device):
            raise ValueError(
                f"impl='triton' cannot run on {device}: it needs CUDA with triton installed, "
                "or TRITON_INTERPRET=1 for the CPU; use impl='auto' or 'torch'"
            )
        return True
    return (
        torch.device(device).type == "cuda"
        and dtype != torch.float64
        and os.environ.get("QSEG_TRITON", "0") == "1"
        and triton_available(device)
    )


def _programs():
    # Imported on first use: importing defines the programs, compiled or interpreted.
    from . import triton_kernels

    return triton_kernels


@dataclass(frozen=True)
class TokenTerms:
    """The weights and parameters of a token-wise mixture, as the token pass takes them.

    Attributes:
        cross_entropy: w_ce; label_smoothing: ε of the cross-entropy term.
        focal, focal_gamma: w_f and γ.
        self_adjusting_dice, sadl_alpha, sadl_gamma: w_d, α and γ_d.
        z_loss: λ, the weight of lse².
    """

    cross_entropy: float = 0.0
    label_smoothing: float = 0.0
    focal: float = 0.0
    focal_gamma: float = 2.0
    self_adjusting_dice: float = 0.0
    sadl_alpha: float = 1.0
    sadl_gamma: float = 1.0
    z_loss: float = 0.0

    # name -> {parameter: field}, the mixture entries the pass knows.
    FIELDS = {
        "cross_entropy": {"weight": "cross_entropy", "label_smoothing": "label_smoothing"},
        "focal": {"weight": "focal", "gamma": "focal_gamma"},
        "self_adjusting_dice": {
            "weight": "self_adjusting_dice",
            "alpha": "sadl_alpha",
            "gamma": "sadl_gamma",
        },
        "z_loss": {"weight": "z_loss"},
    }

    @classmethod
    def supports(cls, losses: dict[str, dict[str, Any]]) -> bool:
        """Whether every entry and parameter of a normalized mixture has a term here."""
        return all(
            name in cls.FIELDS and set(params) <= set(cls.FIELDS[name])
            for name, params in losses.items()
        )

    @classmethod
    def from_losses(cls, losses: dict[str, dict[str, Any]]) -> TokenTerms:
        """From a normalized token-wise mixture {name: {"weight": w, **params}}."""
        if not cls.supports(losses):
            raise ValueError(
                f"the fused token pass computes {sorted(cls.FIELDS)} with parameters "
                f"{ {n: sorted(f) for n, f in cls.FIELDS.items()} }; got {losses}"
            )
        values = {
            cls.FIELDS[name][key]: float(value)
            for name, params in losses.items()
            for key, value in params.items()
        }
        return cls(**values)


def _check_logits(logits: Tensor) -> None:
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        raise ValueError(f"logits must be a 2-D (n, V) tensor; got {_describe(logits)}")
    if logits.dtype not in LOGIT_DTYPES:
        raise ValueError(f"logits must be one of {LOGIT_DTYPES}; got {logits.dtype}")
    if logits.shape[1] > 0 and logits.stride(1) != 1:
        raise ValueError("logits must have contiguous rows (stride 1 along V)")
    if not triton_available(logits.device):
        raise ValueError(
            f"the Triton kernels cannot run on {logits.device}: they need CUDA with triton "
            "installed, or TRITON_INTERPRET=1 for the CPU"
        )


def _check_rows(name: str, value: Tensor | None, logits: Tensor, integer: bool = False) -> None:
    if value is None:
        return
    if not isinstance(value, Tensor) or value.shape != (logits.shape[0],):
        raise ValueError(f"{name} must be a ({logits.shape[0]},) tensor; got {_describe(value)}")
    if value.device != logits.device:
        raise ValueError(f"{name} is on {value.device}, the logits on {logits.device}")
    if integer == value.is_floating_point():
        kind = "an integer" if integer else "a floating-point"
        raise ValueError(f"{name} must be {kind} tensor; got {value.dtype}")


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"{value.dtype} of shape {tuple(value.shape)}"
    return type(value).__name__


def _check_cap(logit_scale: float, softcap: float | None) -> None:
    if not logit_scale > 0 or (softcap is not None and not softcap > 0):
        raise ValueError(
            f"logit_scale must be > 0 and softcap None or > 0; got {logit_scale}, {softcap}"
        )


def launch_config(vocab: int, block_size: int | None = None) -> tuple[int, int]:
    """(columns per step, warps per program) of the programs for a vocabulary of `vocab`;
    `block_size` (a power of two) overrides the columns per step."""
    if block_size is not None:
        if block_size < 1 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two; got {block_size}")
        block = block_size
    else:
        top = INTERPRETER_MAX_BLOCK if interpreting() else MAX_BLOCK
        block = min(top, max(16, 1 << max(vocab - 1, 0).bit_length()))
    return block, min(32, max(4, block // (32 * COLUMNS_PER_THREAD)))


def token_loss_pass_(
    logits: Tensor,
    labels: Tensor,
    terms: TokenTerms,
    *,
    grad_scale: float | None = None,
    row_weights: Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    block_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Each row's token-wise loss, and with `grad_scale` its logit gradient, in one launch.

    Args:
        logits: (n, V) raw logits, float32/bfloat16/float16 with contiguous rows. With
            `grad_scale` they are overwritten by grad_scale · ω_t · dL_t/dr (see the module
            docstring), in their own dtype.
        labels: (n,) integer labels in [0, V), or `ignore_index`.
        terms: the mixture's weights and parameters (`TokenTerms.from_losses`).
        grad_scale: the factor of every gradient (1 / tokens for a mean), or None to leave
            the logits untouched.
        row_weights: (n,) ω_t, each row's factor (loss and gradient), or None for 1.
        logit_scale, softcap: s and c of the logits the losses see.
        block_size: vocabulary columns per step (a power of two); None picks one.

    Returns:
        (loss (n,), lse (n,)), float32: ω_t · L_t (0 for ignored rows) and log Σ_v exp(z_tv).
    """
    _check_logits(logits)
    _check_rows("labels", labels, logits, integer=True)
    _check_rows("row_weights", row_weights, logits)
    _check_cap(logit_scale, softcap)
    n, vocab = logits.shape
    labels = labels.contiguous()
    row_weights = row_weights.contiguous() if row_weights is not None else None
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(loss)
    if n == 0:
        return loss, lse
    block, warps = launch_config(vocab, block_size)
    _programs().token_pass_kernel[(n,)](
        logits,
        logits.stride(0),
        labels,
        row_weights if row_weights is not None else loss,
        loss,
        lse,
        vocab,
        ignore_index,
        float(grad_scale or 0.0),
        float(logit_scale),
        float(softcap or 1.0),
        terms.cross_entropy,
        terms.label_smoothing,
        terms.focal,
        terms.focal_gamma,
        terms.self_adjusting_dice,
        terms.sadl_alpha,
        terms.sadl_gamma,
        terms.z_loss,
        HAS_CAP=softcap is not None,
        HAS_ROW_WEIGHTS=row_weights is not None,
        HAS_SMOOTHING=terms.label_smoothing != 0 and terms.cross_entropy != 0,
        HAS_FOCAL=terms.focal != 0,
        HAS_SADL=terms.self_adjusting_dice != 0,
        WRITE_GRAD=grad_scale is not None,
        BLOCK=block,
        num_warps=warps,
    )
    return loss, lse


def row_logsumexp(
    logits: Tensor,
    *,
    exclude: Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    block_size: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """(n,) log Σ_v exp(z_tv) in float32, reading the logits once and leaving them as is.

    Args:
        logits: (n, V) raw logits, float32/bfloat16/float16 with contiguous rows.
        exclude: (V,) bool, columns left out of a second log-sum-exp (the rest of the
            vocabulary outside a set of classes), or None.
        logit_scale, softcap, block_size: as in `token_loss_pass_`.

    Returns:
        lse (n,), or with `exclude` (lse, rest_lse), rest_lse −inf where every column
        outside `exclude` is at −inf (or none is left).
    """
    _check_logits(logits)
    _check_cap(logit_scale, softcap)
    n, vocab = logits.shape
    if exclude is not None and (
        not isinstance(exclude, Tensor)
        or exclude.dtype != torch.bool
        or exclude.shape != (vocab,)
        or exclude.device != logits.device
    ):
        raise ValueError(
            f"exclude must be a bool ({vocab},) tensor on {logits.device}; got {_describe(exclude)}"
        )
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    rest = torch.empty_like(lse) if exclude is not None else None
    if n > 0:
        block, warps = launch_config(vocab, block_size)
        _programs().row_logsumexp_kernel[(n,)](
            logits,
            logits.stride(0),
            exclude.contiguous().view(torch.uint8) if exclude is not None else lse,
            lse,
            rest if rest is not None else lse,
            vocab,
            float(logit_scale),
            float(softcap or 1.0),
            HAS_CAP=softcap is not None,
            HAS_EXCLUDE=exclude is not None,
            BLOCK=block,
            num_warps=warps,
        )
    return lse if rest is None else (lse, rest)


def scaled_softmax_(
    logits: Tensor,
    origin: Tensor,
    row_scale: Tensor,
    *,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    block_size: int | None = None,
) -> None:
    """logits ← row_scale_t · exp(z_t − origin_t) · dz/dr, in place, in one launch.

    With origin = lse this is row_scale_t · p_t: the softmax part of a logit gradient.

    Args:
        logits: (n, V) raw logits, float32/bfloat16/float16 with contiguous rows.
        origin: (n,) the exponent's origin per row (lse_t, or a partial log-sum-exp).
        row_scale: (n,) each row's factor.
        logit_scale, softcap, block_size: as in `token_loss_pass_`.
    """
    _check_logits(logits)
    _check_rows("origin", origin, logits)
    _check_rows("row_scale", row_scale, logits)
    _check_cap(logit_scale, softcap)
    n, vocab = logits.shape
    if n == 0:
        return
    origin, row_scale = origin.contiguous(), row_scale.contiguous()
    block, warps = launch_config(vocab, block_size)
    _programs().scaled_softmax_kernel[(n,)](
        logits,
        logits.stride(0),
        origin,
        row_scale,
        vocab,
        float(logit_scale),
        float(softcap or 1.0),
        HAS_CAP=softcap is not None,
        BLOCK=block,
        num_warps=warps,
    )
