"""Where examples come from: a dataset name, the shipped GSM8K sample, a hub id, a file or a folder.

``load_examples`` reads rows, recognises their layout from the first row, formats every row
(``formats.format_row``) and logs how many rows were dropped and why. The ``datasets``
package is imported only when the hub is asked for: GPU images may not have it.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from qseg.data.formats import DATASETS, BadFieldError, Example, SkipRow, format_row
from qseg.data.layouts import (
    CHAT_TEMPLATE_MODES,
    CONVERSATIONAL,
    check_fields_present,
    describe,
    detect,
    map_fields,
    wrap_as_chat,
)

log = logging.getLogger(__name__)

HUB_IDS: dict[str, tuple[str, str | None]] = {
    "gsm8k": ("openai/gsm8k", "main"),
    "mathqa": ("allenai/math_qa", None),
    "openbookqa": ("allenai/openbookqa", "additional"),
    "hellaswag": ("Rowan/hellaswag", None),
}
PARQUET_BRANCH = "refs/convert/parquet"
SAMPLE = "gsm8k-sample"
SAMPLE_DIR = Path(__file__).parent / "samples" / "gsm8k"
FILE_TYPES = (".jsonl", ".json", ".parquet")
# Names a split goes by in file names (hellaswag_val_500_en.jsonl, dev.json, train_complete.jsonl).
SPLIT_ALIASES = {
    "train": ("train",),
    "validation": ("validation", "dev", "val", "valid"),
    "test": ("test",),
}


def _split_names(split: str) -> tuple[str, ...]:
    for aliases in SPLIT_ALIASES.values():
        if split in aliases:
            return aliases
    return (split,)


def _read_file(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a .jsonl (one object a line), .json (an array, or {"data": [...]}) or .parquet."""
    if path.suffix == ".jsonl":
        with path.open("rb") as lines:
            for line_number, raw in enumerate(lines, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise ValueError(
                        f"{path}: line {line_number} is not UTF-8 text ({err.reason} at byte "
                        f"{err.start}); is it a binary or corrupt file?"
                    ) from None
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}: line {line_number} is not JSON: {err}") from err
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} is not a readable JSON file: {err}") from None
        rows = data.get("data") if isinstance(data, dict) else data
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON array of rows (or {{'data': [...]}})")
        yield from rows
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq  # ships with `datasets`; only parquet files need it

        yield from pq.read_table(path).to_pylist()
    else:
        raise ValueError(f"{path}: unsupported file type; use one of {', '.join(FILE_TYPES)}")


def _split_file(folder: Path, split: str) -> Path:
    """The one data file in ``folder`` (or its subfolders) named after ``split``."""
    names = _split_names(split)

    def candidates(paths: Iterable[Path]) -> list[Path]:
        found = []
        for path in sorted(paths):
            words = re.split(r"[_\-.]", path.stem.lower())
            if path.suffix in FILE_TYPES and any(name in words for name in names):
                found.append(path)
        return found

    found = candidates(folder.iterdir()) or candidates(folder.glob("*/*"))
    if len(found) == 1:
        return found[0]
    if found:
        listed = ", ".join(str(p.relative_to(folder)) for p in found)
        raise ValueError(f"{folder}: several files for split '{split}' ({listed}); pass one file")
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix in FILE_TYPES)
    raise FileNotFoundError(
        f"{folder}: no {'/'.join(FILE_TYPES)} file for split '{split}' "
        f"(file names may say {', '.join(names)}); data files there: {', '.join(files) or 'none'}"
    )


def _hub_rows(hub_id: str, config: str | None, split: str) -> Iterator[dict[str, Any]]:
    hint = (
        f"pass a local .jsonl/.json/.parquet file or a folder of split files instead, or "
        f"'{SAMPLE}' for the GSM8K sample shipped with qseg"
    )
    try:
        import datasets
    except ImportError as err:
        raise ValueError(f"loading '{hub_id}' from the hub needs `datasets`; {hint}") from err
    try:
        try:
            rows = datasets.load_dataset(hub_id, config, split=split)
        except RuntimeError as err:
            if "scripts are no longer supported" not in str(err):
                raise
            # datasets >= 4 runs no loading scripts (allenai/math_qa, Rowan/hellaswag have
            # them); the hub keeps a parquet conversion of such datasets on this branch.
            rows = datasets.load_dataset(hub_id, config, split=split, revision=PARQUET_BRANCH)
    except Exception as err:  # offline, unknown id, unknown split: all end the same way
        raise ValueError(
            f"could not load hub dataset '{hub_id}' (config {config}, split {split}): the hub "
            f"could not be reached or has no such dataset ({type(err).__name__}: {err}); {hint}"
        ) from err
    yield from rows


def is_one_file(source: str) -> bool:
    """Whether `source` is a single local data file: one set of examples, no splits to
    choose from (a split name is then ignored)."""
    return Path(source).expanduser().is_file()


def _resolve(source: str, split: str) -> tuple[str, Iterator[dict[str, Any]]]:
    """(description used in messages, rows) for any accepted ``source``."""
    if source == SAMPLE:
        if split not in ("train", "test"):
            raise ValueError(f"'{SAMPLE}' has splits train and test, not '{split}'")
        path = SAMPLE_DIR / f"{split}.jsonl"
        return str(path), _read_file(path)
    path = Path(source).expanduser()
    if path.is_dir():
        path = _split_file(path, split)
        return str(path), _read_file(path)
    if path.is_file():
        return str(path), _read_file(path)
    looks_like_hub_id = source.count("/") == 1 and not source.startswith((".", "/", "~"))
    if source in HUB_IDS or (looks_like_hub_id and path.suffix not in FILE_TYPES):
        hub_id, config = HUB_IDS.get(source, (source, None))
        hub_split = "validation" if split in SPLIT_ALIASES["validation"] else split
        return f"hub dataset {hub_id} ({hub_split})", _hub_rows(hub_id, config, hub_split)
    raise FileNotFoundError(
        f"dataset source '{source}' is neither a local file or folder nor a known dataset; use "
        f"one of {', '.join(DATASETS)}, '{SAMPLE}', a hub id like 'openai/gsm8k', or a "
        f"{'/'.join(FILE_TYPES)} file or folder"
    )


def load_examples(source: str, split: str = "train", **options: Any) -> list[Example]:
    """The examples of `read_examples(source, split, **options)`, without its summary."""
    return read_examples(source, split, **options)[0]


def read_examples(
    source: str,
    split: str = "train",
    *,
    fmt: str = "steps",
    limit: int | None = None,
    chat_template: str = "auto",
    fields: dict[str, str] | None = None,
) -> tuple[list[Example], dict[str, Any]]:
    """Read a dataset and format it into examples, with what was decided on the way.

    Args:
        source: a dataset name (gsm8k, mathqa, openbookqa, hellaswag: read from the hub),
            ``"gsm8k-sample"`` (shipped with qseg; splits train/test), a hub id, a local
            .jsonl/.json/.parquet file (``split`` is then ignored) or a folder holding one file
            per split (``dev``/``val`` in a file name stand for ``validation``). Rows are in
            one of the paper's layouts or a user layout (`qseg.data.layouts`).
        split: train, validation (alias dev, val) or test.
        fmt: ``"steps"`` (the paper's targets) or ``"full"`` (GSM8K's whole rationale).
        limit: stop after this many examples.
        chat_template: "auto", "always" or "never" (`layouts.CHAT_TEMPLATE_MODES`); the
            paper's layouts keep their prompts whatever it says.
        fields: {layout field: the user's field name}, from `--fields`.

    Returns:
        (examples, {"layout", "chat_template": "template" | "plain lines" | "none",
        "rows_dropped": {reason: count}}).

    Raises:
        ValueError: unknown layout (the message lists the known ones), a row missing a field
            (with the source and its 1-based row number), an unreachable hub.
        FileNotFoundError: a source that is not there.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of examples, got {limit}")
    if chat_template not in CHAT_TEMPLATE_MODES:
        raise ValueError(
            f"--chat-template must be one of {', '.join(CHAT_TEMPLATE_MODES)}, "
            f"got {chat_template!r}"
        )
    fields = fields or {}
    origin, rows = _resolve(source, split)
    examples: list[Example] = []
    dropped: Counter[str] = Counter()
    layout = None
    for row_number, row in enumerate(rows, 1):
        if layout is None:
            check_fields_present(row, fields, origin)
            layout = detect(map_fields(row, fields))
            if layout is None:
                names = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise ValueError(
                    f"{origin}: unknown data layout (row 1 has fields {names}); "
                    f"known layouts and their fields: {describe()}; or map your own field "
                    "names with --fields prompt=...,completion=..."
                )
        try:
            example = format_row(map_fields(row, fields), layout, fmt)
        except SkipRow as skip:
            dropped[str(skip)] += 1
            continue
        except BadFieldError as err:
            raise ValueError(
                f"{origin}: row {row_number}: {err} ({layout.name} layout needs {layout.fields})"
            ) from err
        examples.append(_with_chat_decision(example, layout.name, chat_template))
        if limit is not None and len(examples) == limit:
            break
    if layout is None:
        raise ValueError(f"{origin}: no rows")
    log.info("loaded %d %s examples from %s", len(examples), layout.name, origin)
    for reason, count in dropped.items():
        log.warning("dropped %d rows of %s: %s", count, origin, reason)
    decision = "none"
    if examples and examples[0].messages is not None:
        decision = "template" if examples[0].template else "plain lines"
    info = {"layout": layout.name, "chat_template": decision, "rows_dropped": dict(dropped)}
    return examples, info


def _with_chat_decision(example: Example, layout: str, mode: str) -> Example:
    """Apply `--chat-template`: conversations render with the template unless "never";
    plain prompt/completion rows become a user and an assistant turn with "always"."""
    if layout in CONVERSATIONAL:
        return replace(example, template=mode != "never")
    if mode == "always" and layout in ("prompt-completion", "alpaca"):
        return wrap_as_chat(example)
    return example
