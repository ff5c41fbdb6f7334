"""Models ready for (Q)LoRA training with qseg's losses.

    loaded = load_model("path/to/model.gguf", lora=LoraSettings(r=8))
    hidden = backbone_hidden_states(loaded.model, input_ids)   # (B, T, d), no logits
    head = output_head(loaded.model)                            # the (V, d) lm head

``sources`` finds the weights (hub id, folder, GGUF and its conversion cache),
``backends`` loads them (transformers or unsloth, 4-bit or not), ``lora`` attaches the
adapters, ``head`` gives the losses the hidden states and the head.
"""

from qseg.models.backends import (
    LoadedModel,
    count_parameters,
    describe,
    import_unsloth,
    load_model,
)
from qseg.models.head import (
    backbone_hidden_states,
    check_head_gives_the_logits,
    decoder_of,
    logit_options,
    output_head,
)
from qseg.models.lora import CHECKPOINTING_KWARGS, DEFAULT_LORA, LoraSettings
from qseg.models.sources import (
    SOURCES_ACCEPTED,
    align_special_tokens,
    convert_gguf,
    default_model_source,
    gguf_cache_dir,
    load_tokenizer,
)

__all__ = [
    "CHECKPOINTING_KWARGS",
    "DEFAULT_LORA",
    "SOURCES_ACCEPTED",
    "LoadedModel",
    "LoraSettings",
    "align_special_tokens",
    "backbone_hidden_states",
    "check_head_gives_the_logits",
    "logit_options",
    "convert_gguf",
    "count_parameters",
    "decoder_of",
    "default_model_source",
    "describe",
    "gguf_cache_dir",
    "import_unsloth",
    "load_model",
    "load_tokenizer",
    "output_head",
]
