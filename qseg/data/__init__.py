"""Datasets in the paper's prompt/answer layouts, tokenized for causal-LM fine-tuning.

    examples = load_examples("gsm8k-sample", "train")           # list[Example]
    features, n_dropped = build_dataset(examples, tokenizer, max_length=128)
    batch = DataCollator(tokenizer.pad_token_id or 0)(features[:2])  # (B, T) tensors

``formats`` holds the per-dataset layouts, ``sources`` finds and reads the rows,
``tokenize`` turns examples into ids and labels.
"""

from qseg.data.formats import DATASETS, Example, format_prompt
from qseg.data.sources import HUB_IDS, SAMPLE, is_one_file, load_examples
from qseg.data.tokenize import (
    IGNORE_INDEX,
    DataCollator,
    answer_length,
    build_dataset,
    encode_prompt,
    tokenize_example,
)

__all__ = [
    "DATASETS",
    "HUB_IDS",
    "IGNORE_INDEX",
    "SAMPLE",
    "DataCollator",
    "Example",
    "answer_length",
    "build_dataset",
    "encode_prompt",
    "format_prompt",
    "is_one_file",
    "load_examples",
    "tokenize_example",
]
