#!/usr/bin/env bash
# Paper scale on a GPU (issue 25 step 7): configs/sweeps/paper_scale_gpu.yaml (the 50-client
# LeNet case and the five-model case, side by side on the one GPU) for at most $1 seconds
# (default 540), then their curves, times and table into $PAPER_SCALE_RESULTS
# (default results/paper_scale_gpu/). Checkpoints stay in $PAPER_SCALE_OUT (default
# outputs/paper_scale_gpu; a five-model hypernetwork with Adam state is several GB): start it
# again to continue from the last one. Arguments after the first go to experiments.runner
# (e.g. --only lenet50, --set rounds=20).
set -uo pipefail
cd "$(dirname "$0")/.."
budget=${1:-540}
shift $(($# > 0 ? 1 : 0))
out=${PAPER_SCALE_OUT:-outputs/paper_scale_gpu}
results=${PAPER_SCALE_RESULTS:-results/paper_scale_gpu}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
for arg in "$@"; do
    [ "$arg" = --out ] && { echo "--out: set PAPER_SCALE_OUT instead" >&2; exit 2; }
done
# INT: the runner stops its workers; KILL a minute later if it hangs (the GPU time is counted)
timeout -k 60 --signal=INT "$budget" python -m experiments.runner \
    configs/sweeps/paper_scale_gpu.yaml --out "$out" --workers 2 --cpus-per-client 4 "$@"
status=$?
[ "$status" = 124 ] && echo "the time budget ran out: start again to continue from the checkpoints"
mkdir -p "$results"
for run in "$out"/*/; do
    [ -f "${run}metrics.jsonl" ] || continue
    name=$(basename "$run")
    mkdir -p "$results/$name"
    for f in config.yaml metrics.jsonl summary.json sweep_run.json; do
        [ -f "$run$f" ] && cp "$run$f" "$results/$name/"
    done
done
if ls "$results"/*/metrics.jsonl >/dev/null 2>&1; then
    python -m experiments.report "$results" || exit 1
fi
# a failed run fails the script (after copying its rows); so does one in a run out of time
if [ "$status" = 124 ] && grep -q '"status": "failed"' "$out/sweep_status.json" 2>/dev/null; then
    exit 1
fi
[ "$status" = 124 ] || exit "$status"
