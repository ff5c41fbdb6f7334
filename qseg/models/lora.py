"""LoRA adapters from peft (or unsloth's wrapper of it), and gradient checkpointing."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import PreTrainedModel

from qseg.constants import LORA_TARGETS

# Non-reentrant checkpointing lets gradients reach LoRA weights even though the frozen
# embedding output does not require grad, and it is what torch recommends.
CHECKPOINTING_KWARGS = {"use_reentrant": False}


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyperparameters; the defaults are the paper's (all attention and MLP projections).

    `targets` is a tuple of module-name suffixes, or the string "all-linear" (every linear
    layer except the lm head).
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    targets: tuple[str, ...] | str = LORA_TARGETS

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoRA r must be a positive integer, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.targets, str):
            if self.targets != "all-linear":
                raise ValueError(
                    f"LoRA targets must be module names or 'all-linear', got {self.targets!r}"
                )
        else:
            object.__setattr__(self, "targets", tuple(self.targets))  # lists from YAML/CLI
            if not self.targets:
                raise ValueError("LoRA targets must name at least one module, or be 'all-linear'")


DEFAULT_LORA = LoraSettings()


def attach_transformers_lora(
    model: PreTrainedModel,
    lora: LoraSettings | None,
    adapter: str | None,
    gradient_checkpointing: bool,
) -> nn.Module:
    # The base is frozen by peft. Unlike peft's prepare_model_for_kbit_training, its
    # embeddings, norms and head stay in the load dtype (bf16 on a GPU), as unsloth keeps
    # them: an fp32 copy would add 4 bytes·V·d twice, more than a small card can spare
    # for a large vocabulary, and under bf16 autocast they compute in bf16 anyway.
    if gradient_checkpointing:
        enable_checkpointing(model)
    if adapter is not None:
        return PeftModel.from_pretrained(model, adapter, is_trainable=True)
    if lora is None:
        return model  # full fine-tuning
    return get_peft_model(model, _peft_config(model, lora))


def attach_unsloth_lora(
    unsloth: ModuleType,
    model: nn.Module,
    lora: LoraSettings | None,
    adapter: str | None,
    gradient_checkpointing: bool,
) -> nn.Module:
    if adapter is not None:
        return PeftModel.from_pretrained(model, adapter, is_trainable=True)
    if lora is None:
        return model
    targets = lora.targets if isinstance(lora.targets, str) else list(lora.targets)
    return unsloth.FastLanguageModel.get_peft_model(
        model,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        bias="none",
        # unsloth's own checkpointing offloads activations to CPU memory
        use_gradient_checkpointing="unsloth" if gradient_checkpointing else False,
    )


def enable_checkpointing(model: PreTrainedModel) -> None:
    # transformers >= 5.2x renamed the method; the old name still works but warns.
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(CHECKPOINTING_KWARGS)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=CHECKPOINTING_KWARGS)
    model.config.use_cache = False  # the KV cache is useless in training and clashes with it


def _peft_config(model: nn.Module, lora: LoraSettings) -> LoraConfig:
    """A LoraConfig for `model`; every named target must exist in it (peft ignores typos)."""
    if not isinstance(lora.targets, str):
        linear_names = {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear)  # bitsandbytes Linear4bit subclasses nn.Linear
        }
        missing = [t for t in lora.targets if t not in linear_names]
        if missing:
            raise ValueError(
                f"LoRA targets {missing} are not linear layers of this model; "
                f"available: {sorted(linear_names)} or 'all-linear'"
            )
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.targets if isinstance(lora.targets, str) else list(lora.targets),
        bias="none",
        task_type="CAUSAL_LM",
    )


def lora_summary(model: nn.Module) -> dict[str, Any] | None:
    config = getattr(model, "peft_config", {}).get("default")
    if config is None:
        return None
    targets = config.target_modules
    return {
        "r": config.r,
        "alpha": config.lora_alpha,
        "dropout": config.lora_dropout,
        "targets": targets if isinstance(targets, str) else sorted(targets),
    }
