#!/usr/bin/env bash
# The longest trainable context, searched until every bracket converges (issue 5), in one
# call of at most 9.5 minutes: Llama-3.1-8B shape, caps 8/12/16/24 GB, three loss mixes,
# qseg vs naive. Carry .gpu-site (bitsandbytes). Results: ${OUT:-benchmarks/results/gpu}.
#
#   usage (repository root, on the GPU machine): bash scripts/gpu_max_context.sh [CAPS...]
set -u
export PYTHONPATH="$PWD/.gpu-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
out=${OUT:-benchmarks/results/gpu}
mkdir -p "$out"
caps=("${@:-8 12 16 24}")
{
  date -u +"%Y-%m-%d %H:%M UTC"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
  # No trial starts after 420 s; the last ones end within their 100 s timeout.
  timeout --kill-after=10 560 python3 -m benchmarks.max_context --device cuda \
    --models llama3.1-8b --caps ${caps[*]} --jobs 4 --time-budget 420 --trial-timeout 100 \
    --out "$out/max_context_gpu.json" --overwrite
  echo "exit $?"
} 2>&1 | tee "$out/max_context_gpu.log"
