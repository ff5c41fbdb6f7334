"""The scripts in examples/ run as a user would run them: on a tiny random-weight model
here (and plain_loop.py on the real SmolLM2-135M-Instruct, slow); the unsloth one, which
needs a GPU, at least compiles."""

from __future__ import annotations

import json
import os
import py_compile
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qseg.models import default_model_source

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *args: str, cwd: Path) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def logged_losses(output: str) -> list[float]:
    return [float(x) for x in re.findall(r"'loss': '?([0-9.]+)", output)]


def test_trl_sft_example(tiny_llama_dir, tmp_path):
    pytest.importorskip("trl")
    out = tmp_path / "sft"
    output = run_example(
        "trl_sft.py", "--model", str(tiny_llama_dir), "--max-steps", "3",
        "--output-dir", str(out), cwd=tmp_path,
    )  # fmt: skip
    assert len(logged_losses(output)) == 3
    assert (out / "adapter_model.safetensors").is_file()


def test_hf_trainer_example(tiny_llama_dir, tmp_path):
    out = tmp_path / "hf"
    output = run_example(
        "hf_trainer.py", "--model", str(tiny_llama_dir), "--max-steps", "2",
        "--output-dir", str(out), cwd=tmp_path,
    )  # fmt: skip
    assert len(logged_losses(output)) == 2
    assert (out / "adapter_model.safetensors").is_file()


def test_plain_loop_example(tiny_llama_dir, tmp_path):
    output = run_example("plain_loop.py", "--model", str(tiny_llama_dir), cwd=tmp_path)
    losses = [float(x) for x in re.findall(r"loss ([0-9.]+)", output)]
    assert len(losses) == 10 and losses[-1] < losses[0]


@pytest.mark.slow
def test_plain_loop_example_on_smollm2(tmp_path):
    try:
        default_model_source()
    except FileNotFoundError as missing:
        pytest.skip(str(missing))
    output = run_example("plain_loop.py", "--max-steps", "3", cwd=tmp_path)
    assert len(re.findall(r"loss ([0-9.]+)", output)) == 3


def test_unsloth_example_compiles():
    py_compile.compile(str(EXAMPLES / "unsloth_sft.py"), doraise=True)


def test_patch_memory_benchmark_runs_both_ways(tmp_path):
    """`benchmarks/patch_memory.py` runs as a file and as a module; its rows carry figures."""
    root = EXAMPLES.parent
    out = tmp_path / "rows.json"
    for command in (["benchmarks/patch_memory.py"], ["-m", "benchmarks.patch_memory"]):
        result = subprocess.run(
            [sys.executable, *command, "--device", "cpu", "--quick", "--losses", "lovasz",
             "--out", str(out), "--overwrite"],
            cwd=root, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        rows = json.loads(out.read_text())
        assert [row["impl"] for row in rows] == ["backbone", "unpatched", "patched"]
        assert all(row["peak_mb"] > 0 for row in rows)
        patched = rows[2]
        assert patched["peak_mb"] < rows[1]["peak_mb"]
        assert patched["added_vs_unpatched"] == pytest.approx(
            (patched["peak_mb"] - rows[0]["peak_mb"]) / rows[1]["peak_mb"], abs=1e-3
        )
