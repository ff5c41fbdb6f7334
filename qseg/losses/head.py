"""Turn an output head into the linear parts the engine multiplies.

The engine computes logits as Σ_i h_i W_iᵀ + b. A plain head is one part (h, W); a
peft LoRA head adds one part per active adapter, (scale · dropout(h) Aᵀ, B), so its
adapters get gradients without W₀ + B·A ever being formed; a bitsandbytes 4-bit head
is dequantized once per call and, being frozen, gets no gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

Parts = tuple[list[Tensor], list[Tensor], Tensor | None]

HEAD_KINDS = (
    "a weight tensor (V, d), an nn.Linear, a peft LoRA-wrapped linear layer "
    "or a bitsandbytes Linear4bit"
)


def head_weight_shape(head: Tensor | nn.Module) -> tuple[int, int]:
    """(V, d) of a head, without dequantizing it."""
    if isinstance(head, Tensor):
        if head.dim() != 2:
            raise ValueError(f"weight must be 2-D (V, d); got shape {tuple(head.shape)}")
        return tuple(head.shape)
    base = _base_layer(head)
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


def _module_parts(head: nn.Module, hidden: Tensor) -> Parts:
    base = _base_layer(head)
    if not isinstance(base, nn.Linear):
        raise ValueError(f"head must be {HEAD_KINDS}; got {type(head).__name__}")
    hiddens, weights = [hidden], [_dense_weight(base)]
    if hasattr(head, "lora_A") and not (head.merged or head.disable_adapters):
        for name in head.active_adapters:
            if name not in head.lora_A:
                continue
            if head.use_dora.get(name, False):
                raise ValueError(f"DoRA adapters on the output head are not supported ({name!r})")
            lora_a, lora_b = head.lora_A[name], head.lora_B[name]
            x = head.lora_dropout[name](hidden.to(lora_a.weight.dtype))
            hiddens.append(head.scaling[name] * (x @ lora_a.weight.T))
            weights.append(lora_b.weight)
    return hiddens, weights, base.bias


def _dense_weight(layer: nn.Linear) -> Tensor:
    """The layer's (V, d) weight; bitsandbytes 4-bit weights are dequantized (frozen)."""
    weight = layer.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None:
        return weight
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(weight.data, quant_state).detach()
