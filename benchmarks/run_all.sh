#!/usr/bin/env bash
# Every benchmark at a small size, one after the other (SmolLM2-135M on CPU: 10 minutes with
# THREADS=1 on a loaded 2-core machine, most of it the per-layer capture baseline and the
# separate runs).
#   bash benchmarks/run_all.sh                 # torch's default thread count
#   THREADS=1 bash benchmarks/run_all.sh       # a shared / oversubscribed CPU (see docs/PERFORMANCE.md)
# Each script prints its own table and its ratio against the baseline measured in the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${THREADS:-0}
t=(--threads "$threads")
python benchmarks/activation_capture.py "${t[@]}" --prompts 8 --max-length 64
python benchmarks/compression_curve.py "${t[@]}" --points 4 --limit 10
python benchmarks/eval_throughput.py "${t[@]}" --limit 20
python benchmarks/laco_search.py "${t[@]}" --prompts 8 --max-length 64
if [ "$threads" -gt 0 ]; then
  python benchmarks/similarity.py --points 512 --threads "$threads"
else
  python benchmarks/similarity.py --points 512
fi
if python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  python benchmarks/gpu_analysis.py
else
  echo "no CUDA: gpu_analysis.py as a CPU smoke check at a tiny shape"
  python benchmarks/gpu_analysis.py --device cpu --small --prompts 8 --seq-len 64 \
    --max-points 256 --eval-batches 2 --eval-seq 128 --lm-eval-limit 10 "${t[@]}"
fi
