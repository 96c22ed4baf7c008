#!/usr/bin/env bash
# Paper scale on a GPU (issue 25 step 7): configs/sweeps/paper_scale_gpu.yaml for at most $1
# seconds (default 540), then the curves, times and the table into results/paper_scale_gpu/.
# Checkpoints stay in outputs/ (a five-model hypernetwork with Adam state is several GB).
# Start it again (on a GPU) to continue from the last checkpoint.
set -uo pipefail
cd "$(dirname "$0")/.."
budget=${1:-540}
out=outputs/paper_scale_gpu
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
timeout --signal=INT "$budget" python -m experiments.runner configs/sweeps/paper_scale_gpu.yaml \
    --out "$out" --cpus-per-client 1
mkdir -p results/paper_scale_gpu
for run in "$out"/*/; do
    name=$(basename "$run")
    mkdir -p "results/paper_scale_gpu/$name"
    for f in config.yaml metrics.jsonl summary.json sweep_run.json; do
        [ -f "$run$f" ] && cp "$run$f" "results/paper_scale_gpu/$name/"
    done
done
python -m experiments.report results/paper_scale_gpu
