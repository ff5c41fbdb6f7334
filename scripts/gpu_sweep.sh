#!/usr/bin/env bash
# The GPU figures beyond gpu_check's, in one call of at most 9 minutes: the loss table at
# both named heads (Llama-3 and Qwen2.5) and 4k/8k/16k/32k tokens, then the longest
# context of the Qwen2.5-7B shape at 16 and 24 GB. Carry .gpu-site (Liger, CCE,
# bitsandbytes). Each part runs under `timeout` and keeps the rows it has when cut off.
# Results go to ${OUT:-benchmarks/results/gpu}:
#   loss_memory_sweep_gpu.json  max_context_qwen_gpu.json  gpu_sweep.log
#
#   usage (repository root, on the GPU machine): bash scripts/gpu_sweep.sh
set -u
export PYTHONPATH="$PWD/.gpu-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
out=${OUT:-benchmarks/results/gpu}
mkdir -p "$out"
{
  date -u +"%Y-%m-%d %H:%M UTC"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
  # At 32768 tokens the full-logit rows (naive, torch) may run out of memory on an 80 GB
  # card: they give an OOM row, not a failure.
  timeout --kill-after=10 330 python3 -m benchmarks.loss_memory --device cuda \
    --shapes llama3 qwen2.5 --tokens 4096 8192 16384 32768 --reps 3 \
    --out "$out/loss_memory_sweep_gpu.json" --overwrite
  echo "loss_memory exit $?"
  # No trial starts after 100 s; the last ones end within their 80 s timeout.
  timeout --kill-after=10 190 python3 -m benchmarks.max_context --device cuda \
    --models qwen2.5-7b --caps 16 24 --jobs 4 --time-budget 100 --trial-timeout 80 \
    --out "$out/max_context_qwen_gpu.json" --overwrite
  echo "max_context exit $?"
} 2>&1 | tee "$out/gpu_sweep.log"
