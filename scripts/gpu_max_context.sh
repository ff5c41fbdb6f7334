#!/usr/bin/env bash
# The longest trainable context, searched until every bracket converges, in one call:
# Llama-3.1-8B shape, caps 8/12/16/24 GB (or CAPS...), three loss mixtures, qseg vs
# naive. Carry .gpu-site (bitsandbytes). Results: ${OUT:-benchmarks/results/gpu}.
# No trial starts after SEARCH_SECONDS (default 420); the call ends within that plus
# 140 s (560 s by default, under a device call's 10 minutes).
#
# It goes on from RESUME=FILE (an earlier call's file copied into the working tree, as
# $OUT starts empty each call), else from $out/max_context_gpu.json (gpu_check.sh's, in
# the same call), else from the committed benchmarks/results/gpu/max_context_gpu.json;
# those two only if searched on this card. The output keeps the rows of searches it does
# not run (other caps).
#
#   usage (repository root, on the GPU machine):
#     [SEARCH_SECONDS=300] [RESUME=FILE] bash scripts/gpu_max_context.sh [CAPS...]
set -u
export PYTHONPATH="$PWD/.gpu-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
out=${OUT:-benchmarks/results/gpu}
mkdir -p "$out"
caps=("${@:-8 12 16 24}")
resume=()
if [ -n "${RESUME:-}" ]; then
  resume=(--resume "$RESUME")
else
  for earlier in "$out/max_context_gpu.json" benchmarks/results/gpu/max_context_gpu.json; do
    if [ -f "$earlier" ]; then
      resume=(--resume "$earlier" --resume-if-same-card)
      break
    fi
  done
fi
{
  date -u +"%Y-%m-%d %H:%M UTC"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
  search=${SEARCH_SECONDS:-420}
  # The last trials end within their 100 s timeout.
  timeout --kill-after=10 $((search + 130)) python3 -m benchmarks.max_context --device cuda \
    --models llama3.1-8b --caps ${caps[*]} --jobs 4 --time-budget "$search" --trial-timeout 100 \
    "${resume[@]}" --out "$out/max_context_gpu.json" --overwrite
  echo "exit $?"
} 2>&1 | tee "$out/max_context_gpu.log"
