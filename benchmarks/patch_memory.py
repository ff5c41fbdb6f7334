"""What `qseg.patch_model` costs in memory: one forward + backward of a whole model.

A SmolLM2-135M-shaped Llama (random weights, float32) at 2048 tokens, each case in a
fresh process (see `benchmarks/common.py`):

- `backbone`: the decoder alone, its loss a sum of the last hidden states: the memory of
  the model's own forward + backward, which any loss adds to;
- `unpatched`: the model's own loss from full logits (`model(..., labels=...)`);
- `patched`: the same call after `qseg.patch_model`, for each mixture asked.

A patched row's `added_vs_unpatched` is (its peak − the backbone's) / the unpatched peak:
the share of the unpatched model's peak that the qseg loss adds on top of the model.

    python benchmarks/patch_memory.py --device cpu --out benchmarks/results/patch_memory_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import qseg
from benchmarks import common
from qseg.loss_text import parse_losses
from qseg.models import backbone_hidden_states

SMOLLM2 = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
}
QUICK = {**SMOLLM2, "num_hidden_layers": 2, "vocab_size": 4096, "hidden_size": 72,
         "intermediate_size": 128}  # fmt: skip
DEFAULT_LOSSES = ("cross_entropy", "cross_entropy:0.6,lovasz:0.4")


def run_case(case: dict) -> dict:
    """One case in this process: build the model and inputs, measure, return the row."""
    torch.manual_seed(0)
    shape = QUICK if case["quick"] else SMOLLM2
    model = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=True))
    batch, length = case["batch"], case["tokens"] // case["batch"]
    input_ids = torch.randint(3, shape["vocab_size"], (batch, length))
    labels = input_ids.clone()
    labels[:, : length // 4] = -100  # a prompt
    if case["impl"] == "patched":
        qseg.patch_model(model, parse_losses(case["loss"]))

    def call() -> None:
        if case["impl"] == "backbone":
            loss = backbone_hidden_states(model, input_ids).sum()
        else:
            loss = model(input_ids=input_ids, labels=labels, use_cache=False).loss
        loss.backward()

    peak, ms = common.measure(
        call, lambda: model.zero_grad(set_to_none=True), torch.device("cpu"), 1
    )
    return {**case, "peak_mb": round(peak, 1), "ms": round(ms, 1)}


def with_ratios(rows: list[dict]) -> list[dict]:
    """Add each patched row's added memory as a share of the unpatched peak."""
    peak = {row["impl"]: row.get("peak_mb") for row in rows}
    for row in rows:
        if row["impl"] == "patched" and peak.get("backbone") and peak.get("unpatched"):
            row["added_vs_unpatched"] = round(
                (row["peak_mb"] - peak["backbone"]) / peak["unpatched"], 3
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_output_args(parser)
    parser.add_argument("--tokens", type=common.positive_int, default=2048)
    parser.add_argument("--batch", type=common.positive_int, default=1)
    parser.add_argument("--losses", nargs="+", default=list(DEFAULT_LOSSES))
    parser.add_argument("--timeout", type=common.positive_float, default=900)
    args = parser.parse_args(argv)
    if args.case:
        common.emit_row(run_case(json.loads(args.case)))
        return
    if args.device not in ("auto", "cpu"):
        raise SystemExit("patch_memory measures CPU memory only: use --device cpu")
    for text in args.losses:
        parse_losses(text)  # a typo fails before any case runs
    common.check_out_path(args.out, args.overwrite)
    tokens = 256 if args.quick else args.tokens
    base = {"tokens": tokens, "batch": args.batch, "quick": args.quick, "loss": None}
    cases = [{**base, "impl": "backbone"}, {**base, "impl": "unpatched", "loss": "cross_entropy"}]
    cases += [{**base, "impl": "patched", "loss": text} for text in args.losses]
    rows = []
    for case in cases:
        rows.append(common.run_isolated("benchmarks.patch_memory", case, args.timeout))
        if args.out:
            common.write_json(with_ratios(rows), args.out, quiet=True)
    rows = with_ratios(rows)
    print(
        common.markdown_table(
            rows, ("impl", "loss", "tokens", "peak_mb", "ms", "added_vs_unpatched")
        )
    )
    if args.out:
        common.write_json(rows, args.out)


if __name__ == "__main__":
    main()
