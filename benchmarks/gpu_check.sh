#!/usr/bin/env bash
# The GPU check: what to run, in one command, the first minutes a CUDA machine is available.
#
#   benchmarks/gpu_check.sh OUT_DIR [BUDGET_SECONDS]
#
# In order of what it tells, each step bounded by what is left of the budget (default 450 s, inside 8 minutes):
#   1. the `gpu`-marked tests (tiny pipelines built on CUDA, CUDA graphs, no device sync in a step);
#   2. random:sd15 at 512x512 in bfloat16 (recipes/bench-sd15-cuda-random.toml): build, then `diffbake bench`
#      with CUDA graphs (eager and the artifact in fresh processes, and the ladder);
#   3. the reduced Flux (recipes/bench-flux-small-cuda.toml): build, then `diffbake bench` (eager, artifact);
#   4. with what time is left: torch.compile cold and warm on random:sd15, for the start-up comparison.
# Nothing comes from the network: the models are made locally with random weights. Every log and report goes
# under OUT_DIR; OUT_DIR/summary.txt says, per step, ok / FAILED (exit code) / SKIPPED (no time left) and how long.
#
# Python: $PYTHON, else .venv/bin/python (`make setup`), else python3; it must see a CUDA device.
set -uo pipefail

if [[ $# -lt 1 || $# -gt 2 ]]; then
    echo "usage: $0 OUT_DIR [BUDGET_SECONDS]" >&2
    exit 2
fi
OUT=$1
BUDGET=${2:-450}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON; elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
SUMMARY=$OUT/summary.txt
START=$SECONDS
: > "$SUMMARY"

# Every build and compile of this run shares one compile cache and one inductor cache under OUT_DIR, so a rerun
# of the check on the same machine skips what the first run compiled (bench still compiles: its build times are
# real compiles).
export DIFFBAKE_COMPILE_CACHE=$OUT/compile-cache
export PYTHONWARNINGS=ignore

note() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME MIN_SECONDS COMMAND...: run COMMAND with its output in OUT_DIR/NAME.log, bounded by the time left;
# skipped when less than MIN_SECONDS is left.
step() {
    local name=$1 least=$2
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    if ((left < least)); then
        note "$(printf '%-28s SKIPPED (%d s left, needs %d s)' "$name" "$left" "$least")"
        return 0
    fi
    local t0=$SECONDS
    timeout --signal=TERM --kill-after=10 "$left" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    local took=$((SECONDS - t0))
    if ((rc == 0)); then
        note "$(printf '%-28s ok in %d s' "$name" "$took")"
    elif ((rc == 124)); then
        note "$(printf '%-28s TIMED OUT after %d s (log: %s.log)' "$name" "$took" "$name")"
    else
        note "$(printf '%-28s FAILED (exit %d) in %d s (log: %s.log)' "$name" "$rc" "$took" "$name")"
        tail -n 15 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$SUMMARY"
    fi
    return 0
}

note "diffbake GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), budget ${BUDGET} s, python $PY"
"$PY" - > "$OUT/environment.txt" 2>&1 <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
    free, total = torch.cuda.mem_get_info()
    print(f"memory: {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB")
EOF
tee -a "$SUMMARY" < "$OUT/environment.txt"
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    note "no CUDA device visible to $PY (see environment.txt): nothing to check"
    exit 1
fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true

BENCH=(-m diffbake.cli bench --steps 8 --repeats 5 --warmup 2 --image-repeats 2)
step gpu-tests 60 "$PY" -m pytest -m gpu -p no:cacheprovider -q tests/test_gpu.py \
    --junitxml="$OUT/gpu-tests.xml"
step sd15-build 120 "$PY" -m diffbake.cli build recipes/bench-sd15-cuda-random.toml \
    --out "$OUT/artifacts/sd15" --force
step sd15-bench 90 "$PY" "${BENCH[@]}" recipes/bench-sd15-cuda-random.toml --artifact "$OUT/artifacts/sd15" \
    --paths eager,artifact --cuda-graphs --out "$OUT/sd15-bench"
step flux-small-build 90 "$PY" -m diffbake.cli build recipes/bench-flux-small-cuda.toml \
    --out "$OUT/artifacts/flux-small" --force
step flux-small-bench 60 "$PY" "${BENCH[@]}" recipes/bench-flux-small-cuda.toml \
    --artifact "$OUT/artifacts/flux-small" --paths eager,artifact --no-ladder --out "$OUT/flux-small-bench"
step sd15-bench-compile 150 "$PY" "${BENCH[@]}" recipes/bench-sd15-cuda-random.toml \
    --artifact "$OUT/artifacts/sd15" --paths compile_cold,compile_warm,artifact --no-ladder --cuda-graphs \
    --out "$OUT/sd15-bench-compile"

for report in sd15-bench flux-small-bench sd15-bench-compile; do
    if [[ -f "$OUT/$report/bench.md" ]]; then
        { echo; echo "== $report/bench.md"; cat "$OUT/$report/bench.md"; } >> "$SUMMARY"
    fi
done
note ""
note "done in $((SECONDS - START)) s; logs and reports in $OUT"
cat "$SUMMARY" | sed -n '/^== /,$p' | head -n 120
