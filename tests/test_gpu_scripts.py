"""The GPU scripts' benchmark commands are accepted by the benchmarks' own parsers.

A GPU is lent rarely and briefly; a misspelt flag in `scripts/gpu_check.sh` would cost a
whole device session. Each `python3 -m benchmarks.NAME ...` command in the scripts is cut
out, its shell variables filled in, and handed to that benchmark's `main`, which is
stopped right after it parses its arguments.
"""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
from pathlib import Path

import pytest

from benchmarks import loss_memory

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = [
    "scripts/gpu_check.sh",
    "scripts/gpu_context.sh",
    "scripts/gpu_kernels.sh",
    "scripts/gpu_max_context.sh",
    "scripts/gpu_sweep.sh",
]
# What the scripts' variables hold when they run.
SHELL_VALUES = {
    "$out": "/tmp/out",
    "${caps[*]}": "8 12 16 24",
    "$search": "420",
    '"${resume[@]}"': "--resume /tmp/earlier.json --resume-if-same-card",
    "$mixes": "cross_entropy lovasz cross_entropy:0.6,generalized_dice:0.4",
    '"$unsloth_file"': "/tmp/out/max_context_unsloth_gpu.json",
    '"$offload_file"': "/tmp/out/max_context_offload_gpu.json",
}
# What a `$(resume_from FILE...)` gives when one of the files exists.
RESUME_FROM = (r"\$\(resume_from [^)]*\)", "--resume /tmp/earlier.json --resume-if-same-card")


class Parsed(Exception):
    def __init__(self, namespace: argparse.Namespace) -> None:
        self.namespace = namespace


def benchmark_commands(script: str) -> list[tuple[str, list[str]]]:
    """(module, argv) of every `python3 -m benchmarks.X` command in `script`."""
    text = (REPO / script).read_text().replace("\\\n", " ")
    commands = []
    for match in re.finditer(r"python3 -m (benchmarks\.\w+)([^\n]*)", text):
        args = re.sub(*RESUME_FROM, match[2])
        for variable, value in SHELL_VALUES.items():
            args = args.replace(variable, value)
        commands.append((match[1], shlex.split(args)))
    return commands


@pytest.mark.parametrize("script", SCRIPTS)
def test_gpu_script_commands_parse(script, monkeypatch):
    commands = benchmark_commands(script)
    assert commands, f"no benchmark command found in {script}"
    parse_args = argparse.ArgumentParser.parse_args

    def stop_after_parsing(parser, args=None, namespace=None):
        raise Parsed(parse_args(parser, args, namespace))  # exits on a bad flag or value

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", stop_after_parsing)
    for module, argv in commands:
        assert "$" not in " ".join(argv), f"unfilled shell variable in {module} {argv}"
        with pytest.raises(Parsed) as parsed:
            importlib.import_module(module).main(argv)
        args = parsed.value.namespace
        assert args.device == "cuda" and args.out is not None and args.overwrite
        for shape in getattr(args, "shapes", None) or []:
            loss_memory.parse_shape(shape)  # named heads are checked only later


def test_gpu_check_fits_in_eight_minutes():
    """One call of at most 8 minutes; every step runs under its own timeout."""
    text = (REPO / "scripts/gpu_check.sh").read_text()
    limits = [int(s) for s in re.findall(r"^\s*step \w+ (\d+) ", text, flags=re.MULTILINE)]
    assert len(limits) == 7 and sum(limits) <= 8 * 60, limits


def test_gpu_sweep_fits_in_one_call():
    """A device call runs at most 10 minutes; the sweep's parts, killed 10 s after their
    timeouts at the latest, end within 9."""
    text = (REPO / "scripts/gpu_sweep.sh").read_text()
    limits = [int(s) for s in re.findall(r"timeout --kill-after=10 (\d+) python3", text)]
    assert len(limits) == 2 and sum(limits) + 10 * len(limits) <= 9 * 60, limits


def test_gpu_kernels_fits_in_eight_minutes():
    """Its steps, killed 10 s after their timeouts at the latest, end within 8 minutes."""
    text = (REPO / "scripts/gpu_kernels.sh").read_text()
    limits = [int(s) for s in re.findall(r"^\s*step \w+ (\d+) ", text, flags=re.MULTILINE)]
    assert len(limits) == 5 and sum(limits) + 10 * len(limits) <= 8 * 60, limits


def test_gpu_context_fits_in_nine_minutes():
    """Its steps, killed 5 s after their timeouts at the latest, end within 9 minutes, and
    each search's last trial (started before its --time-budget ends, stopped by its
    --trial-timeout) ends within its step's timeout, as does each timed trial."""
    text = (REPO / "scripts/gpu_context.sh").read_text().replace("\\\n", " ")
    steps = re.findall(r"^\s*step (\w+) (\d+) (.*)$", text, flags=re.MULTILINE)
    names = [name for name, _, _ in steps]
    assert names == ["checkpoint", "unsloth_r32", "unsloth_r8", "offload", "speed_off", "speed_on"]
    limits = [int(limit) for _, limit, _ in steps]
    assert sum(limits) + 5 * len(limits) <= 9 * 60, limits
    for name, limit, command in steps:
        if "benchmarks.max_context" not in command:
            continue
        flags = dict(re.findall(r"--(time-budget|trial-timeout) (\d+)", command))
        budget = int(flags.get("time-budget", 0))
        # A few seconds for the search's own start (imports) before its first trial.
        assert budget + int(flags["trial-timeout"]) + 5 <= int(limit), (name, flags, limit)
