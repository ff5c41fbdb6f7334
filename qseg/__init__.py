"""qseg: segmentation losses for quantized LoRA fine-tuning of language models."""

__version__ = "0.1.0"
