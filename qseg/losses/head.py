"""Turn an output head into the linear parts the engine multiplies.

The engine computes logits as Σ_i h_i W_iᵀ + b. A plain head is one part (h, W); a
peft LoRA head adds one part per active adapter, (scale · dropout(h) Aᵀ, B), and, for a
`lora_bias=True` adapter, scale · B's bias to b, so its adapters get gradients without
W₀ + B·A ever being formed. A peft `modules_to_save` wrapper stands for its active copy.
bitsandbytes heads are dequantized once per call: a 4-bit or int8 weight is frozen and
gets no gradient; a Linear8bitLt that keeps a float weight gets its int8 round trip,
with the gradient passed straight through to the float weight, as bitsandbytes does.
"""

from __future__ import annotations

import copy
import sys
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .engine import upcasts_half

if TYPE_CHECKING:
    from bitsandbytes.functional import QuantState

Parts = tuple[list[Tensor], list[Tensor], Tensor | None]

HEAD_KINDS = (
    "a weight tensor (V, d), an nn.Linear, a peft LoRA-wrapped linear layer (or a peft "
    "modules_to_save wrapper of a linear layer), or a bitsandbytes Linear4bit or Linear8bitLt"
)


def head_weight_shape(head: Tensor | nn.Module) -> tuple[int, int]:
    """(V, d) of a head, without dequantizing it."""
    if isinstance(head, Tensor):
        if head.dim() != 2 or not head.is_floating_point():
            raise ValueError(
                f"weight must be a 2-D (V, d) floating-point tensor; got {head.dtype} of "
                f"shape {tuple(head.shape)}"
            )
        return tuple(head.shape)
    base = _base_layer(_active_module(head))
    if not isinstance(base, nn.Linear):
        raise ValueError(f"head must be {HEAD_KINDS}; got {type(head).__name__}")
    return base.out_features, base.in_features


def linear_parts(head: Tensor | nn.Module, hidden: Tensor, bias: Tensor | None = None) -> Parts:
    """The parts (h_i, W_i) and bias of `head` applied to `hidden` (n, d).

    Each (h_i, W_i) pair is cast to a common dtype, so every matmul is well defined.
    """
    if isinstance(head, Tensor):
        hiddens, weights = [hidden], [head]
    else:
        if bias is not None:
            raise ValueError("bias= is only for a weight tensor; a module head uses its own bias")
        hiddens, weights, bias = _module_parts(head, hidden)
    pairs = [_common_dtype(h, w) for h, w in zip(hiddens, weights, strict=True)]
    return [h for h, _ in pairs], [w for _, w in pairs], bias


def _common_dtype(h: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    dtype = torch.promote_types(h.dtype, w.dtype)
    return h.to(dtype), w.to(dtype)


def _base_layer(head: nn.Module) -> nn.Module:
    # peft wrappers expose the wrapped layer through get_base_layer().
    return head.get_base_layer() if hasattr(head, "get_base_layer") else head


def _active_module(head: nn.Module) -> nn.Module:
    """The module a peft auxiliary wrapper's forward runs; any other head itself."""
    copies = getattr(head, "modules_to_save", None)
    if isinstance(copies, nn.ModuleDict):
        # As ModulesToSaveWrapper.forward chooses: the active adapter's trained copy, or
        # the frozen original when adapters are off or the active one has no copy here.
        active = head.active_adapters
        if head.disable_adapters or not active or any(a not in copies for a in active):
            return head.original_module
        return copies[active[0]]
    if hasattr(head, "token_adapter"):
        raise ValueError(
            "a peft trainable_token_indices head (TrainableTokensWrapper) is not supported as "
            "a module: pass its merged weight `head.weight` as the weight tensor instead (the "
            "trainable tokens get their gradient through it)"
        )
    return head


def _module_parts(head: nn.Module, hidden: Tensor) -> Parts:
    head = _active_module(head)
    base = _base_layer(head)
    if not isinstance(base, nn.Linear):
        raise ValueError(f"head must be {HEAD_KINDS}; got {type(head).__name__}")
    hiddens, weights, bias = [hidden], [_dense_weight(base, hidden.dtype)], base.bias
    for name in _lora_adapters(head):
        lora_a, lora_b, scale = head.lora_A[name], head.lora_B[name], head.scaling[name]
        down = lora_a.weight
        if upcasts_half(down):  # as the engine does off CUDA: half products in float32
            down = down.float()
        x = head.lora_dropout[name](hidden.to(down.dtype))
        hiddens.append(scale * (x @ down.T))
        weights.append(lora_b.weight)
        # peft adds lora_B(lora_A(x)) · scale, so lora_bias=True adds scale · lora_B's bias.
        if lora_b.bias is not None:
            extra = scale * lora_b.bias
            bias = extra if bias is None else bias + extra
    return hiddens, weights, bias


def _lora_adapters(head: nn.Module) -> list[str]:
    """The LoRA adapters whose parts the head's forward adds to its base layer's output."""
    if _base_layer(head) is head or head.merged or head.disable_adapters:
        return []  # a plain layer, or a peft layer whose forward is its base layer's
    if not hasattr(head, "lora_A"):
        # Another peft tuner (IA3, trainable tokens, ...) changes the base layer's output
        # in its own way: using the base weight alone would silently be wrong.
        raise ValueError(f"head must be {HEAD_KINDS}; got a peft {type(head).__name__} layer")
    names = [name for name in head.active_adapters if name in head.lora_A]
    for name in names:
        # Variants (DoRA, ...) compute their output differently from B·A.
        if name in getattr(head, "lora_variant", {}) or getattr(head, "use_dora", {}).get(name):
            raise ValueError(f"LoRA variants such as DoRA are not supported on the head ({name!r})")
    return names


def _dense_weight(layer: nn.Linear, dtype: torch.dtype) -> Tensor:
    """The (V, d) weight the layer's forward multiplies by; bitsandbytes ones dequantized
    (an 8-bit one in `dtype`, the input's, as its forward does)."""
    weight = layer.weight
    if getattr(weight, "quant_state", None) is not None:
        return _dequantize_4bit(weight)
    bnb = sys.modules.get("bitsandbytes")
    if bnb is not None and isinstance(layer, bnb.nn.Linear8bitLt):
        return _dequantize_8bit(layer, dtype)
    if not weight.is_floating_point():
        raise ValueError(f"head must be {HEAD_KINDS}; got a {weight.dtype} weight")
    return weight


def _dequantize_4bit(weight: Tensor) -> Tensor:
    """A bitsandbytes 4-bit weight as a dense, frozen (V, d) tensor."""
    import bitsandbytes.functional as bnbf

    data, state = weight.data, weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        data, state = _unpack_cpu_4bit(data, state)
    return bnbf.dequantize_4bit(data, state).detach()


def _unpack_cpu_4bit(packed: Tensor, state: QuantState) -> tuple[Tensor, QuantState]:
    """The standard 4-bit layout of a weight bitsandbytes repacked for CPU inference.

    A no-grad eval-mode forward on a CPU with AVX512-BF16 repacks the layer in place and
    keeps it so. Its forward then multiplies by codes · absmax, with absmax rounded to
    bf16: we dequantize to exactly that, leaving the layer packed. bitsandbytes' own
    inverse mutates the state it is given, re-quantizes a nested absmax (lossy) and, in
    0.50, leaves a plain absmax transposed (wrong weights), so it gets a copy that claims
    no nesting, and only its unpacked codes are used.
    """
    import bitsandbytes.functional as bnbf

    inverse = getattr(bnbf, "_convert_weight_packed_for_cpu_inverse", None)
    rows, cols = state.shape
    blocks = (cols // state.blocksize, rows)  # the packed absmax's layout
    if inverse is None or tuple(state.absmax.shape) != blocks:
        raise ValueError(
            "this bitsandbytes 4-bit head was repacked for CPU inference (an eval-mode "
            "forward without grad) in a layout this bitsandbytes version cannot undo here; "
            "reload or re-quantize the head"
        )
    scratch = copy.copy(state)
    scratch.original_nested = False
    codes, _ = inverse(packed, scratch)
    absmax = state.absmax.T.reshape(-1).float()
    unpacked = bnbf.QuantState(
        absmax=absmax,
        shape=state.shape,
        code=state.code,
        blocksize=state.blocksize,
        quant_type=state.quant_type,
        dtype=state.original_dtype,
    )
    return codes, unpacked


def _dequantize_8bit(layer: nn.Linear, dtype: torch.dtype) -> Tensor:
    """A bitsandbytes Linear8bitLt's weight as its (training-mode) forward multiplies by."""
    import bitsandbytes.functional as bnbf

    # Int8Params.to() would make a new, detached parameter: view it as a plain tensor.
    weight = layer.weight.as_subclass(Tensor)
    if weight.dtype == torch.int8:
        # Row scales sit on the weight until the first forward moves them to layer.state.
        scales = getattr(layer.weight, "SCB", None)
        scales = scales if scales is not None else layer.state.SCB
        if scales is None:
            raise ValueError(
                "this bitsandbytes Linear8bitLt has an int8 weight but no scales (SCB): "
                "quantize it with .to(device) or load its checkpoint with them"
            )
        return bnbf.int8_vectorwise_dequant(weight.detach(), scales).to(dtype)
    # A float weight (has_fp16_weights=True, or not quantized yet): bitsandbytes multiplies
    # by its fp16 → int8 round trip and passes the gradient straight through to it.
    codes, scales, _ = bnbf.int8_vectorwise_quant(weight.detach().to(torch.float16))
    weight = weight.to(dtype)
    return weight + (bnbf.int8_vectorwise_dequant(codes, scales).to(dtype) - weight).detach()
