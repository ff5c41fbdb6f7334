"""The model shapes the longest-context search trains, and their random-weight
checkpoints for the unsloth backend.

The transformers backend builds each shape in the trial itself (`benchmarks.context_trial`).
unsloth loads models only from checkpoints (`FastLanguageModel.from_pretrained`), so each
shape is saved once with random bf16 weights and a byte-level tokenizer under
`<qseg cache>/bench-models/<shape>-<layers>-<hash of its config>` and every unsloth trial,
in this call and later ones, loads that folder. It is written under a temporary name and
renamed into place when complete: a folder under the final name is always whole, and a
write cut short leaves only a temporary folder that no trial reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

# Configs of the published models (config.json of meta-llama/Llama-3.1-8B and
# Qwen/Qwen2.5-7B), written out so nothing is downloaded; tiny-llama is for CPU checks.
MODELS: dict[str, dict[str, Any]] = {
    "llama3.1-8b": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
    "qwen2.5-7b": dict(
        model_type="qwen2",
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        use_sliding_window=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    ),
    "tiny-llama": dict(
        model_type="llama",
        vocab_size=2048,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    ),
}
WEIGHTS = "nf4, bf16 embeddings and head"  # the `dtype` column
# The tokenizer's special tokens, at ids 0, 1, 2: the checkpoint's config names them.
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}
CHECKPOINTS = "bench-models"  # the folder under qseg's cache


def checkpoint_folder(name: str, layers: int | None) -> Path:
    """Where the random-weight checkpoint of a shape lives (whether written yet or not).

    Args:
        name: a key of `MODELS`.
        layers: the decoder layers built; None: all of the shape's.

    Returns:
        The folder; its name changes with the shape's config, so an edited shape gets a
        fresh checkpoint.
    """
    from qseg.models.sources import cache_root

    spec = _checkpoint_spec(name, layers)
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    return cache_root() / CHECKPOINTS / f"{name}-{spec['num_hidden_layers']}-{digest}"


def _checkpoint_spec(name: str, layers: int | None) -> dict[str, Any]:
    spec = dict(MODELS[name], pad_token_id=0, bos_token_id=1, eos_token_id=2, use_cache=False)
    if layers is not None:
        spec["num_hidden_layers"] = layers
    return spec


def save_checkpoint(name: str, layers: int | None, device: torch.device) -> tuple[Path, bool]:
    """Save the shape's random-weight checkpoint, unless it is saved already.

    Args:
        name: a key of `MODELS`.
        layers: the decoder layers to build; None: all of the shape's.
        device: where the weights are drawn (a GPU draws billions of them in moments);
            they are written from there, in shards.

    Returns:
        (folder, written): written is False when an earlier call's folder was reused.
    """
    folder = checkpoint_folder(name, layers)
    if folder.is_dir():
        return folder, False
    from transformers import AutoConfig, AutoModelForCausalLM

    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    config = AutoConfig.for_model(**_checkpoint_spec(name, layers))
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(partial, max_shard_size="2GB")
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the trials that follow share the card with this process
    byte_tokenizer().save_pretrained(partial)
    try:
        partial.rename(folder)
    except OSError:
        if not folder.is_dir():  # not another process finishing first: a real failure
            raise
        shutil.rmtree(partial, ignore_errors=True)
        return folder, False
    return folder, True


def byte_tokenizer() -> Any:
    """A byte-level tokenizer without merges (one token per UTF-8 byte): unsloth loads a
    tokenizer with the model, and the trials feed token ids, never text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = [*SPECIAL_TOKENS.values(), *sorted(pre_tokenizers.ByteLevel.alphabet())]
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)


def load_unsloth_model(folder: str, lora_r: int, tokens: int) -> nn.Module:
    """Load a saved checkpoint with unsloth, 4-bit, LoRA of rank `lora_r`, in train mode.

    Call it before anything imports transformers in this process: unsloth patches it when
    imported. LoRA has no dropout here: unsloth's fused LoRA kernels apply only without
    it, as in the setup of unsloth's published context lengths. Its checkpointing
    ("unsloth") keeps layer inputs in CPU memory.

    Args:
        folder: from `save_checkpoint`.
        lora_r: the LoRA rank.
        tokens: the sequence length the trial trains at (unsloth's max_seq_length).

    Returns:
        The peft model.

    Raises:
        RuntimeError: unsloth does not import here.
    """
    # No hub call from a trial: the device machines reach no network, and a hub lookup
    # would wait on its timeout.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from qseg.unsloth_first import import_unsloth_first

    if not import_unsloth_first("unsloth"):
        raise RuntimeError("unsloth does not import here (it needs a CUDA GPU and its package)")
    from unsloth import FastLanguageModel

    from qseg.models import LoraSettings

    model, _ = FastLanguageModel.from_pretrained(
        model_name=folder, max_seq_length=tokens, dtype=None, load_in_4bit=True
    )
    lora = LoraSettings(r=lora_r, dropout=0.0)
    model = FastLanguageModel.get_peft_model(
        model,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.targets),
        bias="none",
        use_gradient_checkpointing="unsloth",
        max_seq_length=tokens,
    )
    return model.train()
