# Sourced by the GPU scripts: each measurement is a step with its own time limit, so one
# that hangs cannot spend the whole device call, and a summary line per step at the end.
steps=$(mktemp -d)
summary=()

# step NAME SECONDS COMMAND...: run it under timeout, its output also in $steps/NAME.
step() {
  local name=$1 limit=$2
  shift 2
  echo
  echo "=== $name (timeout ${limit} s): $*"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$steps/$name"
  local rc=${PIPESTATUS[0]}
  local verdict="ok"
  [ "$rc" = 124 ] && verdict="TIMED OUT"
  [ "$rc" != 0 ] && [ "$rc" != 124 ] && verdict="FAILED (exit $rc)"
  summary+=("$(printf '%-14s %-18s %4d s' "$name" "$verdict" $((SECONDS - start)))")
}

# summarize VERDICT_REGEX: each step's verdict, the benchmarks' verdict lines, the files.
summarize() {
  echo
  echo "=== summary"
  printf '%s\n' "${summary[@]}"
  echo "--- verdicts"
  (cd "$steps" && grep -E "$1" -- *) || echo "(no verdict lines)"
  echo "--- files in $out"
  ls -l "$out"
}
