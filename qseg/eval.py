"""Greedy generation and scoring of a model on a dataset: ``qseg eval``.

The model writes an answer to each prompt (the same prompt layout training used, greedy,
batched, left padded, stopping at EOS or the token limit); ``qseg.metrics`` scores the
answers against the references. The report is JSON::

    {"summary": {"dataset": "gsm8k", "n": 3, "exact_match": ..., "step_iou": ..., ...},
     "examples": [{"prompt": ..., "prediction": ..., "reference": ..., "metrics": {...}}],
     "setup": {"model": ..., "adapter": ..., "split": ..., ...}}

``qseg train --eval-samples N`` calls :func:`evaluate` at the end of training and stores
the summary in ``run.json``.
"""

import argparse
import functools
import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from qseg.data import (
    Example,
    answer_length,
    encode_prompt,
    format_prompt,
    is_one_file,
    load_examples,
)
from qseg.data.chat import generation_prompt, require_template
from qseg.data.layouts import USER_DATASETS, parse_fields
from qseg.generation import generate
from qseg.metrics import score_choice, score_math
from qseg.run_files import read_run
from qseg.text_metrics import compile_answer_pattern, score_text
from qseg.unsloth_first import import_unsloth_first

SCORERS: dict[str, Callable[[Sequence[str], Sequence[str]], dict]] = {
    "gsm8k": score_math,
    "mathqa": score_math,
    "openbookqa": score_choice,
    "hellaswag": score_choice,
}
log = logging.getLogger(__name__)

# Summary entries that count examples rather than score them.
_COUNTS = ("n", "n_with_steps")
# The default answer budget: the longest reference answer's tokens, and a quarter more for
# a model that words it a little longer. A fixed budget cut off right answers: a
# tokenizer that writes numbers digit by digit makes long MathQA answers common.
ANSWER_ROOM = 1.25


def answer_budget(examples: Sequence[Example], tokenizer: Any) -> int:
    """Default ``max_new_tokens`` for ``examples``: room for the longest reference answer.

    Args:
        examples: the examples to be scored (at least one).
        tokenizer: the model's tokenizer, which counts the answers' tokens.

    Returns:
        ``ANSWER_ROOM`` times the longest answer's token count, rounded up.
    """
    return math.ceil(ANSWER_ROOM * max(answer_length(e, tokenizer) for e in examples))


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    answer_pattern: str | None = None,
) -> dict[str, Any]:
    """Generate an answer to each example and score it.

    The scorer follows the examples' dataset: ``score_math`` for gsm8k and mathqa,
    ``score_choice`` for openbookqa and hellaswag (see ``qseg.metrics``), and
    ``qseg.text_metrics.score_text`` (exact match, F1) for users' own layouts. A
    conversation is prompted with its turns before its last assistant turn. Answers stop
    at EOS or after ``max_new_tokens`` tokens (None: :func:`answer_budget`).

    Args:
        model: a causal LM (with or without an adapter).
        tokenizer: its tokenizer.
        examples: the examples to score, all from one dataset.
        batch_size: prompts per ``generate`` call.
        max_new_tokens: the longest answer in tokens, or None for :func:`answer_budget`.
        answer_pattern: users' layouts: a regex whose first group both sides are reduced
            to before scoring (checked against the references before generating).

    Returns:
        ``{"summary": {"dataset", "n", <metrics>}, "examples": [{"prompt", "prediction",
        "reference", "metrics"}], "max_new_tokens": the budget used}``.

    Raises:
        ValueError: no examples, or examples from several datasets or an unknown one.
    """
    if not examples:
        raise ValueError("no examples to evaluate")
    datasets = sorted({example.dataset for example in examples})
    if len(datasets) > 1:
        raise ValueError(f"examples mix datasets {datasets}; evaluate one dataset at a time")
    dataset = datasets[0]
    references = [example.reference for example in examples]
    score = _scorer(dataset, answer_pattern, references)

    prompts = [_prompt_text(example, tokenizer) for example in examples]
    prompt_ids = [encode_prompt(example, tokenizer) for example in examples]
    if max_new_tokens is None:
        max_new_tokens = answer_budget(examples, tokenizer)
    predictions = generate(
        model, tokenizer, prompt_ids, batch_size=batch_size, max_new_tokens=max_new_tokens
    )
    records = []
    for prompt, prediction, reference in zip(prompts, predictions, references, strict=True):
        metrics = score([prediction], [reference])
        records.append(
            {
                "prompt": prompt,
                "prediction": prediction,
                "reference": reference,
                "metrics": {k: v for k, v in metrics.items() if k not in _COUNTS},
            }
        )
    summary = {"dataset": dataset, **score(predictions, references)}
    return {"summary": summary, "examples": records, "max_new_tokens": max_new_tokens}


def _scorer(
    dataset: str, answer_pattern: str | None, references: Sequence[str]
) -> Callable[[Sequence[str], Sequence[str]], dict]:
    """The scorer of `dataset`, refusing before generation what cannot be scored."""
    if dataset == "text":
        raise ValueError(
            "the text layout has no prompt to answer, so qseg eval cannot score it; "
            "evaluate on prompt/completion or messages rows"
        )
    if dataset in USER_DATASETS:
        pattern = compile_answer_pattern(answer_pattern, references) if answer_pattern else None
        return functools.partial(score_text, answer_pattern=pattern)
    if answer_pattern:
        raise ValueError(
            f"--answer-pattern applies to your own data, not to {dataset}, which is scored "
            "by its own rules"
        )
    if dataset not in SCORERS:
        raise ValueError(f"no scorer for dataset '{dataset}'; known: {', '.join(SCORERS)}")
    return SCORERS[dataset]


def _prompt_text(example: Example, tokenizer: Any) -> str:
    """The prompt as the model reads it, for the report."""
    if example.messages is None:
        return format_prompt(example)
    return generation_prompt(example.messages, tokenizer, example.template)


def format_table(summary: dict[str, Any]) -> str:
    """A two-column text table of a summary; fractions with 3 decimals, None as n/a.

    Args:
        summary: metric name -> value, as :func:`evaluate`'s "summary".

    Returns:
        The table, one line per metric under a header.
    """
    width = max(len(name) for name in summary)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  -----"]
    for name, value in summary.items():
        if value is None:
            shown = "n/a"
        elif isinstance(value, float):
            shown = f"{value:.3f}"
        else:
            shown = str(value)
        lines.append(f"{name:<{width}}  {shown}")
    return "\n".join(lines)


def print_table(summary: dict[str, Any]) -> None:
    """Print :func:`format_table` of a summary.

    Args:
        summary: metric name -> value.
    """
    print(format_table(summary))


def check_held_out(setup: dict[str, Any], config: dict[str, Any], dataset_given: bool) -> None:
    """Refuse to score an adapter on the one file it was trained on unless that file was
    named; warn when the scored split is the one it was trained on.

    Args:
        setup: what is to be scored: its "dataset" and "split".
        config: the adapter's training config (empty for a base model alone).
        dataset_given: whether the user named the dataset (--dataset).

    Raises:
        ValueError: the adapter's one training file, not named by the user.
    """
    if not config or setup["dataset"] != config.get("dataset"):
        return
    if is_one_file(setup["dataset"]):
        if not dataset_given:
            raise ValueError(
                f"the adapter was trained on the single file {setup['dataset']}, which has no "
                "held-out split; pass --dataset TEST_FILE (or a folder of split files)"
            )
        log.warning("scoring the adapter on %s, the file it was trained on", setup["dataset"])
    elif setup["split"] == config.get("split", "train"):
        log.warning(
            "scoring the adapter on split %r of %s, the examples it was trained on",
            setup["split"],
            setup["dataset"],
        )


def run_eval(args: argparse.Namespace) -> int:
    """``qseg eval``: load the model (and adapter), generate, score, print and save.

    Args:
        args: the parsed ``qseg eval`` flags (see ``qseg.cli.add_eval_arguments``).

    Returns:
        0; bad input raises ValueError or FileNotFoundError before the model loads.
    """
    output = Path(args.output) if args.output else None
    if output is not None and output.is_dir():
        raise ValueError(f"--output {output} is a folder; give the report's file name")
    if output is not None and output.exists() and not args.overwrite:
        raise ValueError(f"{output} exists; pass --overwrite to replace it or choose another file")
    for flag, value in (
        ("--limit", args.limit),
        ("--batch-size", args.batch_size),
        ("--max-new-tokens", args.max_new_tokens),
    ):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")

    config = read_run(args.adapter)["config"] if args.adapter else {}
    import_unsloth_first(config.get("backend", "auto"))
    # Imported here, after unsloth: peft and bitsandbytes take seconds to import, which
    # `qseg --help` should not wait for.
    from qseg.models import default_model_source, load_model, load_tokenizer

    setup = {
        "model": args.model or config.get("model") or default_model_source(),
        "adapter": str(args.adapter) if args.adapter else None,
        "loss": config.get("loss"),
        "dataset": args.dataset or config.get("dataset") or "gsm8k-sample",
        "split": args.split or config.get("eval_split") or "test",
        "format": args.format or config.get("format") or "steps",
        "chat_template": args.chat_template or config.get("chat_template") or "auto",
        "fields": parse_fields(args.fields) or config.get("fields"),
        "answer_pattern": args.answer_pattern,
        "max_new_tokens": args.max_new_tokens or config.get("eval_max_new_tokens"),
    }
    check_held_out(setup, config, dataset_given=args.dataset is not None)
    examples = load_examples(
        setup["dataset"],
        setup["split"],
        fmt=setup["format"],
        limit=args.limit,
        chat_template=setup["chat_template"],
        fields=setup["fields"],
    )
    if not examples:
        raise ValueError(f"split '{setup['split']}' of {setup['dataset']} holds no examples")
    # What cannot be scored or rendered fails here, before the model loads.
    _scorer(examples[0].dataset, setup["answer_pattern"], [e.reference for e in examples])
    if any(example.messages is not None and example.template for example in examples):
        require_template(
            load_tokenizer(setup["model"]),
            f"--chat-template {setup['chat_template']} renders the data's conversations with "
            "the tokenizer's chat template",
        )
    loaded = load_model(
        setup["model"],
        quantization=config.get("quantization", "auto"),
        backend=config.get("backend", "auto"),
        lora=None,
        gradient_checkpointing=False,
        adapter=setup["adapter"],
        trainable=False,
    )
    setup["backend"], setup["quantization"] = loaded.backend, loaded.quantization

    report = evaluate(
        loaded.model,
        loaded.tokenizer,
        examples,
        batch_size=args.batch_size,
        max_new_tokens=setup["max_new_tokens"],
        answer_pattern=setup["answer_pattern"],
    )
    setup["max_new_tokens"] = report.pop("max_new_tokens")
    report["setup"] = setup
    print_table(report["summary"])
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        print(f"report written to {output}")
    return 0
