"""The losses' handshake with the model: its output head and its last hidden states.

The losses take the hidden states and the head instead of the logits, so they never
build a (batch, tokens, vocabulary) tensor.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from peft import PeftModel
from torch import nn

from qseg.losses import transform_logits

log = logging.getLogger(__name__)


def output_head(model: nn.Module) -> nn.Module:
    """The lm head (V, d) of `model`, through any peft/unsloth wrapping.

    It may be a plain `nn.Linear`, a peft LoRA layer (when "lm_head" is a LoRA target) or a
    bitsandbytes `Linear4bit`; `qseg.losses.head` lists every kind the losses take.
    """
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output head (get_output_embeddings)")
    return head


def backbone_hidden_states(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Last hidden states (B, T, d), after the final norm, without computing logits.

    Runs the decoder inside the causal LM (e.g. `LlamaForCausalLM.model`), so LoRA layers,
    dropout and gradient checkpointing apply exactly as in `model(...)`;
    `hidden @ output_head(model).weight.T` equals `model(...).logits`.

    input_ids: (B, T) long; attention_mask: (B, T), 1 on real tokens, or None.
    """
    decoder = decoder_of(model)
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


def decoder_of(model: nn.Module) -> nn.Module:
    """The transformer stack (embeddings, layers, final norm) inside a causal LM (or its
    peft wrapper). `get_decoder()` alone is not enough: before transformers 5 it returns
    None for Llama-type models."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if decoder is None or decoder is base:
        decoder = getattr(base, getattr(base, "base_model_prefix", ""), None)
    if decoder is None or decoder is base:
        raise ValueError(f"cannot find the decoder inside {type(base).__name__}")
    return decoder


def logit_options(config: Any) -> dict[str, float]:
    """The `fused_linear_loss` options that turn a model's head product into its logits.

    Gemma 2 and later soft-cap their logits (`final_logit_softcapping`: c·tanh(z / c)),
    Cohere multiplies them by `logit_scale`, Granite divides them by `logits_scaling`.

    Args:
        config: the model's transformers config (a multimodal one's text config is read).

    Returns:
        {"logit_softcap": c, "logit_scale": s}, each only where the config sets it.
    """
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    options = {}
    if getattr(config, "final_logit_softcapping", None) is not None:
        options["logit_softcap"] = float(config.final_logit_softcapping)
    if getattr(config, "logit_scale", None) is not None:
        options["logit_scale"] = float(config.logit_scale)
    if getattr(config, "logits_scaling", None) is not None:
        options["logit_scale"] = 1.0 / float(config.logits_scaling)
    return options


def check_head_gives_the_logits(model: nn.Module) -> None:
    """Raise ValueError unless `model`'s own logits are its head applied to its last hidden
    states, then scaled and soft-capped as `logit_options(model.config)` says, which is how
    qseg's losses compute them (never materialising the logits).

    Gemma 2 to 4 soft-cap their logits (30·tanh(z/30)), Granite divides and Cohere
    multiplies them by a constant, all declared in their configs; a model that transforms
    its logits in a way its config does not declare would be trained on other logits than
    it predicts with. Checked on a few tokens, in the model's
    own mode (an eval-mode pass would switch bitsandbytes' 4-bit layers on a CPU to an
    inference format that passes no gradient), with the same random dropout in both.
    """
    embeddings = model.get_input_embeddings()
    device = embeddings.weight.device
    input_ids = (torch.arange(1, 9, device=device) % embeddings.num_embeddings)[None]
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(0)
        logits = model(input_ids=input_ids, use_cache=False).logits
        torch.manual_seed(0)
        fused = output_head(model)(backbone_hidden_states(model, input_ids))
        fused = transform_logits(fused, **logit_options(model.config))
    if logits.shape != fused.shape:  # a backend that leaves out the logits: nothing to compare
        log.info("logits check skipped: the model returned logits of shape %s", logits.shape)
        return
    # The same modules run in both: only the rounding of half-precision kernels may differ.
    exact = logits.dtype == fused.dtype == torch.float32
    logits, fused = logits.float(), fused.float()
    tolerance = (1e-5 if exact else 2e-2) * max(1.0, logits.abs().max().item())
    gap = (logits - fused).abs().max().item()
    if gap > tolerance:
        kind = getattr(model.config, "model_type", type(model).__name__)
        raise ValueError(
            f"{kind} model: its logits are not its head applied "
            f"to its last hidden states (they differ by up to {gap:.3g}), even with the "
            f"logit options its config declares ({logit_options(model.config) or 'none'}); "
            "qseg's fused losses compute the logits that way, so qseg cannot train it"
        )
