"""The benchmark scripts run end to end in quick mode on CPU, and the harness measures right.

Each script runs as users run it (`python -m benchmarks.NAME --device cpu --quick`) in a
subprocess; the JSON rows it writes are checked for the agreed schema and for figures
that are positive and finite.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import common, context_search, context_setups, max_context
from benchmarks.context_search import Search, Searcher

REPO = Path(__file__).resolve().parents[1]
SCHEMA = {
    "impl": str,
    "loss": str,
    "tokens": int,
    "vocab": int,
    "hidden": int,
    "dtype": str,
    "device": str,
}


def run_script(module: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    if check:
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done


def load_rows(path: Path) -> list[dict]:
    rows = json.loads(path.read_text())
    assert isinstance(rows, list) and rows
    for row in rows:
        for key, kind in SCHEMA.items():
            assert isinstance(row[key], kind), (key, row)
        assert row["device"] == "cpu"
        assert "peak_mb" in row and "ms" in row
        if common.measured(row):
            for key in ("peak_mb", "ms"):
                assert math.isfinite(row[key]) and row[key] > 0, (key, row)
    return rows


def test_loss_memory_quick(tmp_path: Path) -> None:
    out = tmp_path / "loss_memory.json"
    losses = ["cross_entropy", "generalized_dice"]
    done = run_script(
        "benchmarks.loss_memory",
        "--device",
        "cpu",
        "--quick",
        "--out",
        str(out),
        "--losses",
        *losses,
    )
    rows = load_rows(out)
    by_impl = {(r["impl"], r["loss"]): r for r in rows}
    expected = {(impl, "cross_entropy") for impl in ("torch", "torch_linear", "liger", "cce")}
    expected |= {(impl, loss) for impl in ("naive", "qseg") for loss in losses}
    assert set(by_impl) == expected
    for impl in ("liger", "cce"):  # no GPU here: a row that says why, not a silent gap
        assert "CUDA" in by_impl[impl, "cross_entropy"]["skipped"]
    peer = by_impl["torch_linear", "cross_entropy"]  # torch's own chunked linear CE, >= 2.13
    if hasattr(torch.nn.functional, "linear_cross_entropy"):
        assert common.measured(peer) and peer["peak_mb"] > 0
    else:
        assert "no F.linear_cross_entropy" in peer["skipped"]
    for loss in losses:
        qseg, naive = by_impl["qseg", loss], by_impl["naive", loss]
        assert common.measured(qseg) and common.measured(naive)
        assert qseg["chunk_size"] == 64 and qseg["reps"] == 1  # --quick: one timed call
        assert qseg["peak_vs_naive"] == pytest.approx(qseg["peak_mb"] / naive["peak_mb"])
        assert qseg["ms_vs_torch_ce"] > 0 and isinstance(qseg["issue2_pass"], bool)
    assert "| impl | loss |" in done.stdout and "target vs naive [" in done.stdout


def test_loss_memory_profile_names_the_work(tmp_path: Path) -> None:
    """--profile adds one profiled call per case: its largest operators (kernels on CUDA),
    which must include the head's matmuls, and their total time."""
    out = tmp_path / "profile.json"
    done = run_script(
        "benchmarks.loss_memory", "--device", "cpu", "--quick", "--profile", "--out", str(out),
        "--impls", "qseg", "naive", "--losses", "focal",
    )  # fmt: skip
    rows = load_rows(out)
    assert [(r["impl"], r["loss"]) for r in rows] == [("qseg", "focal"), ("naive", "focal")]
    for row in rows:
        profile = row["profile"]
        names = [k["name"] for k in profile["top"]]
        assert any("mm" in name for name in names), names
        assert profile["launches"] >= sum(k["calls"] for k in profile["top"]) > 0
        assert profile["device_ms"] >= sum(k["ms"] for k in profile["top"]) > 0
        assert f"--- {row['impl']} focal: {profile['launches']} operators" in done.stdout


def test_kernel_profile_counts_each_cuda_kernel_once(monkeypatch) -> None:
    """The profiler reports a kernel's time on the kernel and again on the operator that
    launched it: a CUDA profile keeps the kernels only. One aten::mm launching one 0.5 ms
    kernel, built as the profiler's own parser builds them."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import EventList, FunctionEvent

    shared = dict(thread=0, input_shapes=[], stack=[], scope=0, use_device="cuda", fwd_thread=0)
    op = FunctionEvent(1, "aten::mm", start_us=0, end_us=100, **shared)
    kernel = FunctionEvent(
        2, "gemm_kernel", start_us=10, end_us=510, device_type=DeviceType.CUDA, **shared
    )
    op.append_kernel(kernel.name, 0, 500)
    events = EventList([op, kernel], use_device="cuda")
    events._build_tree()

    class Recorded:
        def __init__(self, **options):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def key_averages(self):
            return events.key_averages()

    monkeypatch.setattr(torch.profiler, "profile", Recorded)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    profile = common.kernel_profile(lambda: None, torch.device("cuda"))
    assert profile["launches"] == 1 and profile["device_ms"] == pytest.approx(0.5)
    assert [k["name"] for k in profile["top"]] == ["gemm_kernel"]


def test_autotune_quick(tmp_path: Path) -> None:
    out = tmp_path / "autotune.json"
    run_script(
        "benchmarks.autotune", "--device", "cpu", "--quick", "--out", str(out), "--losses", "lovasz"
    )
    rows = load_rows(out)
    qseg = [r for r in rows if r["impl"] == "qseg"]
    sizes = sorted(r["chunk_size"] for r in qseg if not r["pick"])
    assert sizes == [64, 128, 256]
    (pick,) = [r for r in qseg if r["pick"]]
    assert 0 < pick["chunk_size"] <= pick["valid_tokens"]
    assert isinstance(pick["within_10pct"], bool) and pick["fastest_chunk"] in [
        *sizes,
        pick["chunk_size"],
    ]
    assert all(r["budget_mb"] > 0 and isinstance(r["fits_budget"], bool) for r in qseg)
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_max_context_cpu_trial(tmp_path: Path) -> None:
    """Trials of both impls, two LoRA ranks and offloading asked for: on a CPU there is no
    other memory to offload to, so the trials train without it and their rows say so.
    unsloth's rows are skipped rows (it needs a CUDA GPU)."""
    out = tmp_path / "max_context.json"
    mix = "cross_entropy:0.6,generalized_dice:0.4"
    run_script(
        "benchmarks.max_context", "--device", "cpu", "--quick", "--mixes", mix, "--out", str(out),
        "--lora-r", "8", "32", "--offload-activations", "--steps", "2",
        "--backends", "transformers", "unsloth", "--impls", "qseg", "naive", "unsloth",
    )  # fmt: skip
    rows = load_rows(out)
    trained = [r for r in rows if r["backend"] == "transformers"]
    assert sorted((r["impl"], r["lora_r"]) for r in trained) == [
        ("naive", 8), ("naive", 32), ("qseg", 8), ("qseg", 32)
    ]  # fmt: skip
    for row in trained:
        assert row["status"] == "ok" and row["loss"] == mix and row["model"] == "tiny-llama"
        assert row["cap_gb"] is None  # CPU runs one trial, no emulated cap
        assert row["total_peak_mb"] >= row["peak_mb"] > 0
        assert row["offload_activations"] is False and "no GPU" in row["note"]
        assert row["tokens_per_s"] == pytest.approx(row["tokens"] / row["step_ms"] * 1e3)
    skipped = [r for r in rows if r["backend"] == "unsloth"]
    assert len(skipped) == 4 and all("CUDA GPU" in r["skipped"] for r in skipped)


def test_the_unsloth_checkpoint_is_saved_once_and_reused(tmp_path, monkeypatch) -> None:
    from transformers import AutoConfig

    from benchmarks import context_models

    monkeypatch.setenv("QSEG_CACHE", str(tmp_path))
    folder = context_models.checkpoint_folder("tiny-llama", None)
    # A save cut short leaves a temporary folder: never taken for the checkpoint.
    partial = folder.parent / f".{folder.name}.partial-1"
    partial.mkdir(parents=True)
    (partial / "config.json").write_text("{")
    cpu = torch.device("cpu")
    assert context_models.save_checkpoint("tiny-llama", None, cpu) == (folder, True)
    config = AutoConfig.from_pretrained(folder)
    assert (config.num_hidden_layers, config.vocab_size) == (2, 2048)
    assert (folder / "tokenizer.json").is_file() and list(folder.glob("*.safetensors"))
    written = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert context_models.save_checkpoint("tiny-llama", None, cpu) == (folder, False)
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == written
    # Another layer count is another checkpoint.
    one_layer = context_models.checkpoint_folder("tiny-llama", 1)
    assert one_layer != folder and not one_layer.exists()
    assert not list(folder.parent.glob(f".{folder.name}.partial-{os.getpid()}"))


def test_existing_output_is_not_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "taken.json"
    out.write_text("[]")
    done = run_script(
        "benchmarks.loss_memory", "--device", "cpu", "--quick", "--out", str(out), check=False
    )
    assert done.returncode != 0 and "--overwrite" in done.stderr
    assert out.read_text() == "[]"


def test_cpu_peak_measures_an_allocation() -> None:
    """A 64 MiB tensor made inside the measured call reads as 64 MiB, not the process's RSS."""
    code = (
        "import torch; from benchmarks import common; "
        "big = torch.ones(1 << 22); "  # 16 MiB made before: excluded
        "call = lambda: torch.ones(1 << 24).sum(); call(); "  # warm-up: thread pools etc.
        "print(common.peak_added_mb(call, torch.device('cpu')))"
    )
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) == pytest.approx(64, abs=1.0)


def test_zipf_labels() -> None:
    labels = common.zipf_labels(4, 2000, 500, generator=torch.Generator().manual_seed(0))
    valid = labels[labels != common.IGNORE_INDEX]
    assert labels.shape == (4, 2000)
    assert 0.08 < 1 - valid.numel() / labels.numel() < 0.12
    assert valid.min() >= 0 and valid.max() < 500
    counts = torch.bincount(valid, minlength=500).sort(descending=True).values
    assert counts[0] > 10 * counts[50] > 0  # a heavy head, as in text


def test_parse_mix() -> None:
    assert common.losses_arg("lovasz") == "lovasz"
    mix = common.parse_losses_text("cross_entropy:0.6,generalized_dice:0.4")
    weights = {name: term["weight"] for name, term in mix.items()}
    assert weights == {"cross_entropy": 0.6, "generalized_dice": 0.4}
    assert common.losses_label(mix) == "cross_entropy:0.6,generalized_dice:0.4"
    with pytest.raises(ValueError, match="name:weight"):
        common.parse_losses_text("cross_entropy:lots")


def simulate(
    searcher: Searcher, need_mb, max_trials: float = math.inf, slow_from: float = math.inf
) -> None:
    """Run the searcher against a memory model, one trial at a time, to the end or for
    `max_trials` trials; trials from `slow_from` tokens on time out."""
    model_mb = 5000.0
    for trial in itertools.count():
        if trial >= max_trials:
            return
        todo = [
            (s, t)
            for s in sorted(searcher.searches, key=lambda s: s.trials)
            if (t := searcher.probe(s)) is not None
        ]
        if not todo:
            return
        s, tokens = todo[0]
        s.busy = True
        peak = model_mb + need_mb(tokens, s)
        fits = peak <= s.cap_gb * 1024
        row = {
            "tokens": tokens,
            "status": "timeout" if tokens >= slow_from else "ok" if fits else "oom",
            "model_mb": model_mb,
            "total_peak_mb": peak,
            "peak_mb": peak - model_mb,
            "ms": 1.0,
        }
        searcher.record(s, row)


@pytest.mark.parametrize(
    ("need_mb", "max_trials"),
    [
        (lambda t, s: 0.4 * t, 9),  # linear, as activations with flash attention
        (lambda t, s: 0.4 * t * (1 + 0.01 * math.sin(t)), 9),  # with allocator noise
        (lambda t, s: 0.2 * t + 2e-6 * t * t, 30),  # strongly superlinear
    ],
)
def test_search_finds_the_longest_length_that_fits(need_mb, max_trials) -> None:
    searches = [Search("m", "ce", "qseg", cap) for cap in (8, 16, 24)]
    searcher = Searcher(512, 131072, 4096, searches, resolution=0.05)
    simulate(searcher, need_mb)
    for s in searches:
        assert searcher.done(s) and s.hi is not None
        assert s.hi - s.lo <= max(512, 0.05 * s.lo)
        assert 5000 + need_mb(s.lo, s) <= s.cap_gb * 1024 < 5000 + need_mb(s.hi, s)
    # Predictions from measured peaks and sharing between caps keep the search short.
    assert sum(s.trials for s in searches) <= max_trials


def test_search_stops_when_the_model_alone_does_not_fit() -> None:
    searches = [Search("m", loss, impl, cap) for loss, impl in LOSS_IMPLS for cap in (4, 8, 16)]
    searcher = Searcher(1024, 65536, 4096, searches)
    searcher.record(searches[1], {"tokens": 4096, "status": "oom", "oom_stage": "build"})
    for s in searches:  # whatever the loss, the same model cannot be built under 4 or 8 GB
        assert (searcher.done(s) and s.lo == 0 and s.model_too_big) == (s.cap_gb <= 8)


LOSS_IMPLS = [(loss, impl) for loss in ("ce", "lovasz") for impl in ("qseg", "naive")]


def test_other_mixes_guide_a_search_and_save_trials() -> None:
    """Three mixes whose memory differs a little: the later ones start near their limit."""
    needs = {"ce": 0.0, "lovasz": 300.0, "mix": 150.0}
    searches = [Search("m", loss, "qseg", cap) for loss in needs for cap in (12, 16, 24)]
    searcher = Searcher(512, 131072, 4096, searches, resolution=0.05)
    simulate(searcher, lambda t, s: 0.45 * t + needs[s.loss])
    for s in searches:
        assert searcher.done(s) and s.hi is not None
        assert 5000 + 0.45 * s.lo + needs[s.loss] <= s.cap_gb * 1024
    first = sum(s.trials for s in searches if s.loss == "ce")
    later = sum(s.trials for s in searches if s.loss != "ce")
    assert later < 2 * first, (first, later)


@pytest.mark.parametrize("cut_after", [2, 3, 6])
def test_a_resumed_search_goes_on_where_it_stopped(cut_after: int, tmp_path: Path) -> None:
    def searcher() -> Searcher:
        searches = [Search("tiny-llama", loss, "qseg", cap) for loss in needs for cap in (16, 24)]
        return Searcher(512, 131072, 4096, searches, resolution=0.05)

    needs = {"cross_entropy": 0.0, "lovasz": 300.0}
    memory = lambda t, s: 0.45 * t + needs[s.loss]  # noqa: E731
    whole, cut = searcher(), searcher()
    simulate(whole, memory)
    simulate(cut, memory, max_trials=cut_after)
    assert not all(cut.done(s) for s in cut.searches)
    args = argparse.Namespace(
        layers=None,
        granularity=512,
        resolution=0.05,
        jobs=1,
        max_tokens=131072,
        models=["tiny-llama"],
        resume=tmp_path / "earlier.json",
        resume_if_same_card=False,
    )

    def resumed_from(earlier: Searcher) -> Searcher:
        """A new search seeded with `earlier`'s rows, written and read back as --resume does."""
        cpu = torch.device("cpu")
        rows = [context_search.search_row(s, earlier, cpu, args) for s in earlier.searches]
        args.resume.write_text(json.dumps(rows))
        resumed = searcher()
        resumed.resume(context_search.earlier_rows(args, cpu))
        return resumed

    resumed = resumed_from(cut)
    seeded = sum(s.trials for s in resumed.searches)
    assert seeded == cut_after
    simulate(resumed, memory)
    for one, other in zip(whole.searches, resumed.searches, strict=True):
        assert resumed.done(other) and (other.lo, other.hi) == (one.lo, one.hi)
    # The cut run's trials are not run again (give or take the one a bracket loses).
    new_trials = sum(s.trials for s in resumed.searches) - seeded
    assert new_trials <= sum(s.trials for s in whole.searches) - cut_after + 1

    # Resuming searches that all converged (as gpu_check.sh does) runs no trial at all.
    again = resumed_from(resumed)
    assert all(again.done(s) for s in again.searches)
    before = sum(s.trials for s in again.searches)
    simulate(again, memory)
    assert sum(s.trials for s in again.searches) == before

    args.granularity = 1024  # another setup's brackets are not taken for this one's
    with pytest.raises(SystemExit, match="same card and setup"):
        context_search.earlier_rows(args, torch.device("cpu"))


def test_a_trial_past_its_timeout_bounds_the_search_without_ending_it() -> None:
    searches = [Search("m", "ce", "qseg", cap) for cap in (16, 24)]
    searcher = Searcher(512, 131072, 4096, searches, resolution=0.05)
    simulate(searcher, lambda t, s: 0.4 * t, slow_from=20000)  # 16 GB fits ~28k: too slow
    for s in searches:
        assert searcher.done(s) and s.error is None and s.lo < 20000 <= s.slow
        assert not searcher.converged(s)  # a time limit, not the memory limit
    assert searches[0].lo >= 20000 * 0.95 - 512  # the search went on below the timeout


def test_an_isolated_worker_that_printed_its_row_before_a_timeout_counts(tmp_path, monkeypatch):
    worker = """
import sys, time
from benchmarks import common
if sys.argv[-1] == '{"row": true}':
    common.emit_row({"impl": "qseg", "peak_mb": 1.0, "ms": 2.0})
time.sleep(60)  # e.g. compiler workers slow to shut down
"""
    (tmp_path / "slow_worker.py").write_text(worker)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    row = common.run_isolated("slow_worker", {"row": True}, timeout=5)
    assert row == {"impl": "qseg", "peak_mb": 1.0, "ms": 2.0}
    row = common.run_isolated("slow_worker", {"impl": "naive"}, timeout=5)
    assert row["status"] == "timeout" and "timed out after 5 s" in row["error"]


def test_a_case_that_fails_is_a_row_and_the_others_still_run(monkeypatch, capsys) -> None:
    from benchmarks import loss_memory

    def run_case(case):
        if case["impl"] == "torch":
            raise RuntimeError("a kernel bug")
        return {**case, "peak_mb": 1.0, "ms": 1.0}

    monkeypatch.setattr(loss_memory, "run_case", run_case)
    case = {"loss": "cross_entropy", "tokens": 8, "vocab": 16, "hidden": 4}
    cases = [{**case, "impl": impl} for impl in ("torch", "qseg")]
    rows = loss_memory.run_all(cases, torch.device("cpu"), isolate=False, timeout=1)
    assert rows[0]["error"] == "RuntimeError: a kernel bug" and rows[0]["device"] == "cpu"
    assert common.measured(rows[1])


# --- the verdicts, on rows whose figures are known --------------------------------------


def gpu_row(impl: str, loss: str, peak_mb: float, ms: float) -> dict:
    shape = dict(tokens=8192, vocab=128256, hidden=4096, dtype="bfloat16", device="H100")
    return dict(shape, impl=impl, loss=loss, peak_mb=peak_mb, ms=ms)


def test_the_targets_against_liger_use_each_loss_kind_s_bounds() -> None:
    from benchmarks import loss_memory

    rows = [
        gpu_row("liger", "cross_entropy", 1000.0, 50.0),
        gpu_row("torch", "cross_entropy", 12000.0, 40.0),
        gpu_row("qseg", "cross_entropy", 1000.0, 59.0),  # 1.0x memory, 1.18x time: pass
        gpu_row("qseg", "focal", 1010.0, 50.0),  # 1.01x memory: over the token-wise 1.0x
        gpu_row("qseg", "lovasz", 1400.0, 79.0),  # 1.4x, 1.58x: within the region bounds
        gpu_row("qseg", "generalized_dice", 1400.0, 81.0),  # 1.62x time: over 1.6x
    ]
    loss_memory.add_ratios(rows)
    lines = loss_memory.check_criteria(rows)
    qseg = {row["loss"]: row for row in rows if row["impl"] == "qseg"}
    assert qseg["cross_entropy"]["ms_vs_liger"] == pytest.approx(59 / 50)
    assert qseg["cross_entropy"]["peak_vs_torch_ce"] == pytest.approx(1000 / 12000)
    assert qseg["cross_entropy"]["ms_vs_torch_ce"] == pytest.approx(59 / 40)
    passed = {loss: row["issue5_pass"] for loss, row in qseg.items()}
    assert passed == {
        "cross_entropy": True,
        "focal": False,
        "lovasz": True,
        "generalized_dice": False,
    }
    assert len(lines) == 4 and "lovasz (region): peak 1.40x Liger (<= 1.5)" in lines[2]


def test_the_tuner_s_pick_is_judged_against_the_fastest_size_in_its_budget() -> None:
    from benchmarks import autotune

    def row(size, peak_mb, ms, **pick) -> dict:
        fields = dict(impl="qseg", loss="cross_entropy", chunk_size=size, valid_tokens=4096)
        return {**gpu_row("qseg", "cross_entropy", peak_mb, ms), **fields, **pick}

    plan = dict(chunk_budget_mb=65.0, chunk_bytes_per_row=2**18, device_budget_mb=384.0)
    # peak = 1000 MiB fixed + 0.25 MiB per row: 256 rows fit 65 MiB, 512 rows do not
    sweep = [row(256, 1064.0, 60.0), row(512, 1128.0, 45.0), row(1024, 1256.0, 40.0)]
    for pick_ms, within in ((64.0, True), (70.0, False)):
        rows = [*map(dict, sweep), row(224, 1056.0, pick_ms, **plan)]
        (line,) = autotune.analyse(rows)
        pick = rows[-1]
        assert [r["fits_budget"] for r in rows] == [True, False, False, True]
        assert pick["fastest_chunk"] == 256 and pick["within_10pct"] is within
        # What holding the budget below the device's costs: 1024 rows fit 384 MiB.
        assert pick["fastest_in_device_budget"] == 1024
        assert pick["ms_vs_device_fastest"] == pytest.approx(pick_ms / 40)
        assert "the fastest is 1024 rows" in line


def test_the_memory_call_starts_from_a_reset(monkeypatch) -> None:
    """Gradients the warm-up left would make the measured call's look free."""
    events = []
    monkeypatch.setattr(common, "peak_added_mb", lambda call, device: events.append("peak") or 1.0)
    common.measure(
        lambda: events.append("call"), lambda: events.append("reset"), torch.device("cpu"), 2
    )
    assert events == ["reset", "call", "reset", "peak", "reset", "call", "reset", "call"]


@pytest.mark.parametrize(
    ("module", "argv", "message"),
    [
        ("loss_memory", ["--losses", "ce", "dicee"], "unknown loss 'dicee'"),
        ("loss_memory", ["--tokens", "0"], "--tokens: expected a positive integer"),
        ("loss_memory", ["--shapes", "foo"], "shape 'foo' is neither VxD"),
        ("loss_memory", ["--reps", "0"], "--reps: expected a positive integer"),
        ("autotune", ["--sizes", "64", "-1"], "--sizes: expected a positive integer"),
        ("max_context", ["--mixes", "cross_entropy:0.6,lovsz:0.4"], "unknown loss 'lovsz'"),
        ("max_context", ["--caps", "0"], "--caps: expected a positive number"),
        ("max_context", ["--impls", "unsloth"], "--impls unsloth runs on --backends unsloth"),
        ("max_context", ["--lora-r", "0"], "--lora-r: expected a positive integer"),
    ],
)
def test_bad_flags_are_refused_before_any_case_runs(module, argv, message, capsys) -> None:
    import importlib

    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(f"benchmarks.{module}").main(["--device", "cpu", *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_old_rows_mixtures_are_read_and_written_in_today_s_form(tmp_path: Path) -> None:
    """Results written with `a:0.6+b:0.4` resume into searches named `a:0.6,b:0.4`."""
    assert common.read_losses_label("ce:0.6+gdice:0.4") == "cross_entropy:0.6,generalized_dice:0.4"
    assert common.read_losses_label("lovasz") == "lovasz"
    assert common.read_losses_label("ce:1e+06,lovasz:1") == "cross_entropy:1e+06,lovasz:1"
    with pytest.raises(argparse.ArgumentTypeError, match="name:weight,name:weight"):
        common.losses_arg("cross_entropy:0.6+lovasz:0.4")  # the CLI takes today's form only
    committed = sorted((REPO / "benchmarks" / "results").rglob("*.json"))
    labels = {row["loss"] for path in committed for row in json.loads(path.read_text())}
    labels.discard(None)  # rows of the model alone (patch_memory's backbone) have no loss
    for label in labels:
        today = common.read_losses_label(label)
        assert "+" not in today and common.read_losses_label(today) == today

    mix = "cross_entropy:0.6,generalized_dice:0.4"
    old = dict(
        model="tiny-llama", loss="cross_entropy:0.6+generalized_dice:0.4", impl="qseg",
        cap_gb=16, device="cpu", granularity=512, layers=2, tokens=8192, oom_tokens=8704,
        measured_tokens=8192, model_mb=100.0, peak_mb=1.0, total_peak_mb=101.0, ms=1.0,
        trials=3,
    )  # fmt: skip
    args = argparse.Namespace(
        models=["tiny-llama"], layers=None, granularity=512, resume=tmp_path / "old.json",
        resume_if_same_card=False,
    )  # fmt: skip
    args.resume.write_text(json.dumps([old]))
    rows = context_search.earlier_rows(args, torch.device("cpu"))
    assert [row["loss"] for row in rows] == [mix]
    search = Search("tiny-llama", mix, "qseg", 16)
    searcher = Searcher(512, 131072, 4096, [search], resolution=0.05)
    searcher.resume(rows)
    assert (search.lo, search.hi, search.trials) == (8192, 8704, 3) and searcher.done(search)


def test_rows_without_setup_keys_resume_as_transformers_r8_without_offloading(tmp_path):
    """Rows written before rows named their setup seed only the searches of that setup."""
    old = dict(
        model="tiny-llama", loss="cross_entropy", impl="qseg", cap_gb=16, device="cpu",
        granularity=512, layers=2, tokens=8192, oom_tokens=8704, measured_tokens=8192,
        model_mb=100.0, peak_mb=1.0, total_peak_mb=101.0, ms=1.0, trials=3,
    )  # fmt: skip
    args = argparse.Namespace(
        models=["tiny-llama"], layers=None, granularity=512, resume=tmp_path / "old.json",
        resume_if_same_card=False,
    )  # fmt: skip
    args.resume.write_text(json.dumps([old]))
    args.resolution, args.jobs, args.max_tokens = 0.05, 1, 131072
    rows = context_search.earlier_rows(args, torch.device("cpu"))
    assert rows[0]["backend"] == "transformers" and rows[0]["lora_r"] == 8
    assert rows[0]["offload_activations"] is False
    same = Search("tiny-llama", "cross_entropy", "qseg", 16)
    others = [
        Search("tiny-llama", "cross_entropy", "qseg", 16, lora_r=32),
        Search("tiny-llama", "cross_entropy", "qseg", 16, offload_activations=True),
        Search("tiny-llama", "cross_entropy", "qseg", 16, backend="unsloth"),
    ]
    searcher = Searcher(512, 131072, 4096, [same, *others], resolution=0.05)
    searcher.resume(rows)
    assert (same.lo, same.hi, same.trials) == (8192, 8704, 3)
    assert all((s.lo, s.hi, s.trials) == (0, None, 0) for s in others)
    written = context_search.search_row(same, searcher, torch.device("cpu"), args)
    assert context_setups.row_key(written) == context_setups.row_key(old) == same.key


def test_unsloth_searches_on_a_simulated_card_share_one_checkpoint(tmp_path, monkeypatch):
    """With unsloth available: its checkpoint is saved once per shape before the trials,
    its trials say where it is, and each row is compared with unsloth's own path."""
    import types

    from benchmarks import context_setups

    saved, trials = [], []
    per_token = {"qseg": 0.3, "unsloth": 0.32, "naive": 0.9}

    def trial(module, case, timeout):
        trials.append(case)
        need = 5000.0 + per_token[case["impl"]] * case["tokens"]
        row = dict(case, model_mb=5000.0)
        if need > case["cap_gb"] * 1024:
            return dict(row, status="oom", oom_stage="step")
        return dict(row, status="ok", total_peak_mb=need, peak_mb=need - 5000.0, ms=1.0)

    def save(name, layers, device):
        saved.append(name)
        return tmp_path / name, False

    card = types.SimpleNamespace(total_memory=80 * 2**30)
    monkeypatch.setenv("QSEG_CACHE", str(tmp_path))
    monkeypatch.setattr(common, "run_isolated", trial)
    monkeypatch.setattr(common, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(common, "device_name", lambda device: "Simulated 80 GB card")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: card)
    monkeypatch.setattr(context_setups, "unsloth_missing", lambda device: None)
    monkeypatch.setattr(max_context, "unsloth_missing", lambda device: None)
    monkeypatch.setattr(max_context, "save_checkpoint", save)
    out = tmp_path / "max_context.json"
    max_context.main(
        ["--caps", "16", "--mixes", "ce", "lovasz", "--backends", "unsloth",
         "--impls", "qseg", "unsloth", "--lora-r", "32", "--out", str(out)]
    )  # fmt: skip
    rows = json.loads(out.read_text())
    assert saved == ["llama3.1-8b"]
    assert all(case["checkpoint"].startswith(str(tmp_path)) for case in trials)
    assert {(r["impl"], r["loss"]) for r in rows} == {
        ("qseg", "cross_entropy"), ("qseg", "lovasz"), ("unsloth", "cross_entropy")
    }  # fmt: skip
    own = next(r for r in rows if r["impl"] == "unsloth")
    for row in rows:
        assert (row["backend"], row["lora_r"], row["offload_activations"]) == ("unsloth", 32, True)
    for row in rows:
        if row is not own:
            assert row["vs_unsloth"] == pytest.approx(row["tokens"] / own["tokens"])
    assert "vs_unsloth" not in own
    assert rows[0]["vs_unsloth"] > 1  # qseg's cross-entropy needs a little less here


def scripts() -> list[str]:
    """The benchmarks a user runs: the modules with a `__main__` block."""
    found = sorted((REPO / "benchmarks").glob("*.py"))
    return [p.stem for p in found if 'if __name__ == "__main__":' in p.read_text()]


@pytest.mark.parametrize("form", ["module", "file"])
@pytest.mark.parametrize("name", scripts())
def test_every_script_runs_as_a_module_and_as_a_file(name: str, form: str) -> None:
    """From the repository root, without PYTHONPATH: `python -m benchmarks.NAME` and
    `python benchmarks/NAME.py` both reach the script's own parser."""
    command = ["-m", f"benchmarks.{name}"] if form == "module" else [f"benchmarks/{name}.py"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, *command, "--help"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage: ") and "--device" in done.stdout


def test_loss_aliases_become_canonical_names() -> None:
    assert common.loss_arg("gdice") == "generalized_dice"
    assert common.losses_arg("ce:0.6,gdice:0.4") == "cross_entropy:0.6,generalized_dice:0.4"
    assert common.losses_arg("iou") == "jaccard"


# --- the longest-context search on a simulated card --------------------------------------


def test_the_gpu_search_runs_end_to_end_on_a_simulated_card(tmp_path, monkeypatch, capsys):
    """`max_context.main` with CUDA and its trials simulated: concurrent trials, brackets
    shared between caps, rows written as they come, ratios, and unsloth rows (skipped here:
    unsloth is not installed on the machine that runs the tests)."""
    import threading
    import types

    model_mb, per_token = 5500.0, {"qseg": 0.45, "naive": 0.9}
    trials, lock = [], threading.Lock()

    def trial(module, case, timeout):
        with lock:
            trials.append(case)
        need = model_mb + per_token[case["impl"]] * case["tokens"]
        row = dict(case, model_mb=model_mb)
        if need > case["cap_gb"] * 1024:
            return dict(row, status="oom", oom_stage="step")
        return dict(row, status="ok", total_peak_mb=need, peak_mb=need - model_mb, ms=1.0)

    card = types.SimpleNamespace(total_memory=80 * 2**30)
    monkeypatch.setattr(common, "run_isolated", trial)
    monkeypatch.setattr(common, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(common, "device_name", lambda device: "Simulated 80 GB card")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: card)
    out = tmp_path / "max_context.json"
    argv = ["--caps", "16", "24", "--mixes", "ce", "lovasz", "--jobs", "4", "--out", str(out)]
    max_context.main(
        [*argv, "--backends", "transformers", "unsloth", "--impls", "qseg", "naive", "unsloth"]
    )

    rows = json.loads(out.read_text())
    searched = [r for r in rows if r["backend"] != "unsloth"]
    # unsloth: qseg per mixture, its own path with cross-entropy only.
    assert len(searched) == 8 and len(rows) == 11
    for row in searched:
        limit = (row["cap_gb"] * 1024 - model_mb) / per_token[row["impl"]]
        assert row["converged"] and row["tokens"] <= limit < row["oom_tokens"]
        assert row["oom_tokens"] - row["tokens"] <= max(512, 0.05 * row["tokens"])
        assert row["device"] == "Simulated 80 GB card" and row["model"] == "llama3.1-8b"
    qseg_ce = next(r for r in searched if r["impl"] == "qseg" and r["cap_gb"] == 24)
    naive_ce = next(r for r in searched if r["impl"] == "naive" and r["cap_gb"] == 24)
    assert qseg_ce["vs_naive"] == pytest.approx(qseg_ce["tokens"] / naive_ce["tokens"])
    skipped = [r for r in rows if r["backend"] == "unsloth"]
    assert all("not installed" in r["skipped"] for r in skipped)
    assert sorted((r["impl"], r["loss"]) for r in skipped) == [
        ("qseg", "cross_entropy"), ("qseg", "lovasz"), ("unsloth", "cross_entropy")
    ]  # fmt: skip
    for row in rows:
        assert row["lora_r"] == 8 and row["offload_activations"] == (row["backend"] == "unsloth")
    assert len(trials) <= 40  # predictions and shared brackets keep the search short
    assert "| model | layers |" in capsys.readouterr().out

    # A later run of another cap goes on from that file and keeps its rows as they were.
    before, again = len(trials), tmp_path / "again.json"
    argv = ["--caps", "8", "--mixes", "ce", "lovasz", "--resume", str(out), "--out", str(again)]
    max_context.main([*argv, "--impls", "qseg", "naive"])
    rows_again = json.loads(again.read_text())
    assert len(rows_again) == 12 and {r["cap_gb"] for r in rows_again} == {8, 16, 24}
    assert all(row in rows_again for row in searched)
    assert trials[before:] and all(case["cap_gb"] == 8 for case in trials[before:])

    # An old failure is not carried on; another card's file is refused, or set aside.
    failed = dict(searched[0], cap_gb=12.0, error="worker exited with 1")
    out.write_text(json.dumps([*searched, failed]))
    argv = ["--caps", "8", "--mixes", "ce", "--impls", "qseg", "--resume", str(out)]
    max_context.main([*argv, "--out", str(again), "--overwrite"])
    assert not any(r.get("error") for r in json.loads(again.read_text()))
    monkeypatch.setattr(common, "device_name", lambda device: "Another card")
    with pytest.raises(SystemExit, match="Resume only a search of the same card"):
        max_context.main([*argv, "--out", str(again), "--overwrite"])
    max_context.main([*argv, "--resume-if-same-card", "--out", str(again), "--overwrite"])
    fresh = json.loads(again.read_text())
    assert [(r["cap_gb"], r["device"]) for r in fresh] == [(8, "Another card")]
