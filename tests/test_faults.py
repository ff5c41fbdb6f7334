"""Faults a laptop meets: a diverging run, a second run into the same folder, checkpoints
left incomplete, a full disk, truncated or undecodable files. Each ends in a correct result
or in one clear line with exit code 2, and nothing of the user's is lost."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file

from qseg.cli import main
from qseg.models.sources import remove_stale_conversions

MAX_LENGTH = 64


def train_argv(model: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--model", str(model), "--output-dir", str(out), "--batch-size", "2",
        "--max-length", str(MAX_LENGTH), "--eval-samples", "0", "--quantization", "none",
        "--loss", "cross_entropy:0.6,lovasz:0.4", "--lr", "1e-3", *extra,
    ]  # fmt: skip


def one_error_line(capsys) -> str:
    """The error: the last line on stderr (progress bars may come before it), no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_a_diverging_run_stops_and_saves_no_adapter(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "diverged"
    argv = train_argv(tiny_llama_dir, out, "--lr", "1e30", "--warmup-steps", "0",
                      "--max-steps", "4", "--save-steps", "1")  # fmt: skip
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert "training diverged at step" in line and "lower --lr" in line
    assert not (out / "adapter_model.safetensors").exists() and not (out / "run.json").exists()
    for checkpoint in out.glob("checkpoint-*"):  # whatever was kept holds finite weights
        weights = load_file(checkpoint / "adapter_model.safetensors")
        assert all(bool(torch.isfinite(w).all()) for w in weights.values()), checkpoint


def test_a_second_run_into_the_same_folder_stops_at_once(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    with open(out / ".qseg-lock", "a+") as held:  # what a running qseg train holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242")
        held.flush()
        assert main(train_argv(tiny_llama_dir, out, "--max-steps", "1")) == 2
    line = one_error_line(capsys)
    assert f"output dir {out} is in use by another qseg run (pid 4242)" in line
    assert [p.name for p in out.iterdir()] == [".qseg-lock"]  # nothing written beside it


def test_resume_skips_incomplete_checkpoints_and_matches_an_uninterrupted_run(
    tiny_llama_dir, tmp_path, caplog
):
    caplog.set_level(logging.INFO)
    straight = tmp_path / "straight"
    assert main(train_argv(tiny_llama_dir, straight, "--max-steps", "4", "--save-steps", "2")) == 0

    broken = tmp_path / "broken"
    assert main(train_argv(tiny_llama_dir, broken, "--max-steps", "4", "--save-steps", "2")) == 0
    # A kill while checkpoint-4 was written, and a later save that never started.
    (broken / "checkpoint-4" / "optimizer.pt").unlink()
    (broken / "checkpoint-6").mkdir()
    (broken / "eval.json").write_text("{}")  # an earlier run's report
    shutil.rmtree(straight / "checkpoint-4")  # not needed: straight resumes from 2 as well
    for run in (straight, broken):
        assert main(["train", "--output-dir", str(run), "--resume", "--max-steps", "4"]) == 0
    assert "--resume skips checkpoint-6: missing" in caplog.text
    assert "--resume skips checkpoint-4: missing optimizer.pt" in caplog.text
    assert f"resuming from {broken / 'checkpoint-2'}" in caplog.text
    a = load_file(straight / "adapter_model.safetensors")
    b = load_file(broken / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (broken / "eval.json").exists()  # the resumed run scored nothing
    assert (broken / "checkpoint-4" / ".qseg-complete").is_file()


def test_resume_with_overwrite_is_refused(tmp_path, capsys):
    argv = ["train", "--output-dir", str(tmp_path / "o"), "--resume", "--overwrite"]
    assert main(argv) == 2
    assert "pass one of them" in one_error_line(capsys)


def test_a_full_disk_is_one_line(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transformers.Trainer, "_save_checkpoint", no_space)
    out = tmp_path / "full"
    assert main(train_argv(tiny_llama_dir, out, "--max-steps", "2", "--save-steps", "1")) == 2
    line = one_error_line(capsys)
    assert f"out of disk space while writing {out}" in line and "--overwrite" in line


def test_an_undecodable_data_file_names_its_line(tiny_llama_dir, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_bytes(b'{"prompt": "a", "completion": "b"}\n\xa1\xff\x00binary\n')
    argv = train_argv(tiny_llama_dir, tmp_path / "o", "--dataset", str(data))
    assert main(argv) == 2
    assert f"{data}: line 2 is not UTF-8 text" in one_error_line(capsys)


def test_truncated_and_missing_adapters_are_named(tiny_llama_dir, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "run.json").write_text(json.dumps({"config": {"model": str(tiny_llama_dir)}}))
    assert main(["eval", "--adapter", str(adapter), "--limit", "1"]) == 2
    assert "has no weights (adapter_model.safetensors): its run did not finish" in (
        one_error_line(capsys)
    )
    (adapter / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    assert main(["eval", "--adapter", str(adapter), "--limit", "1"]) == 2
    assert "is truncated or corrupt" in one_error_line(capsys)


def test_a_truncated_gguf_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QSEG_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 20)  # the header, then nothing
    assert main(train_argv(gguf, tmp_path / "o", "--max-steps", "1")) == 2
    assert f"model file {gguf} is truncated or corrupt" in one_error_line(capsys)
    assert not list((tmp_path / "cache" / "gguf").glob("*")) or all(
        p.name.startswith(".") is False for p in (tmp_path / "cache" / "gguf").iterdir()
    )


def test_compare_refuses_a_report_whose_figures_are_not_numbers(tmp_path, capsys):
    report = tmp_path / "edited.json"
    summary = {"dataset": "gsm8k", "n": 3, "exact_match": "0.5"}
    report.write_text(json.dumps({"summary": summary, "setup": {"adapter": None}}))
    assert main(["compare", str(report)]) == 2
    err = capsys.readouterr().err
    assert "exact_match is '0.5', not a number" in err and "Traceback" not in err


def test_a_folder_left_by_an_unfinished_save_can_be_overwritten(tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    assert main(train_argv(tiny_llama_dir, out, "--max-steps", "2", "--save-steps", "2")) == 0
    partial = out / "checkpoint-4"  # a save that died half-way: no completion marker
    partial.mkdir()
    (partial / "optimizer.pt").write_bytes(b"\x00" * 10)
    argv = train_argv(tiny_llama_dir, out, "--max-steps", "1", "--overwrite")
    assert main(argv) == 0
    assert not partial.exists() and (out / "adapter_model.safetensors").is_file()


def test_stale_conversion_folders_are_removed(tmp_path):
    dead = tmp_path / ".model-1-abc.999999999.x1"  # no such process
    alive = tmp_path / f".model-1-abc.{os.getpid()}.x2"
    kept = tmp_path / "model-1-abc"  # a finished conversion
    for folder in (dead, alive, kept):
        folder.mkdir()
    assert remove_stale_conversions(tmp_path) == [dead]
    assert alive.is_dir() and kept.is_dir() and not dead.exists()


def test_a_truncated_cache_entry_names_the_folder_to_delete(tiny_llama_dir, tmp_path, capsys):
    cached = tmp_path / "cached"  # what convert_gguf leaves: a folder with its provenance
    shutil.copytree(tiny_llama_dir, cached)
    (cached / "qseg_gguf.json").write_text("{}")
    weights = cached / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    assert main(train_argv(cached, tmp_path / "o", "--max-steps", "1")) == 2
    line = one_error_line(capsys)
    assert f"the cached conversion {cached} cannot be read" in line and "delete" in line
