#!/usr/bin/env bash
# Issue-4 comparison on SmolLM2-135M: dense, reverse (both), shortgpt, angular and MKA variants at
# 4 and 8 of 30 layers removed, on piqa, hellaswag, race and boolq, offline data. Each method walks
# both points in one process (curve). Two lanes run side by side, one torch thread each (on a
# 2-core machine that is ~1.3x the throughput of one 2-thread process).
#   bash benchmarks/compare_methods.sh [OUTPUT_ROOT] [LIMIT]   then: python -m mka_exp.report OUTPUT_ROOT
set -euo pipefail
out=${1:-outputs/compare_methods}
limit=${2:-200}
data=${MKA_EXP_DATA_ROOT:-../shared/benchmarks}
common=(logger=none "eval.tasks=[piqa,hellaswag,race,boolq]" eval.limit=$limit "data_root=$data"
  "paths.output_root=$out")
curve="curve=[0.13333,0.26667]"   # 4 and 8 of 30 layers
export OMP_NUM_THREADS=1
mkdir -p "$out"
run() { python run.py "$@" "${common[@]}"; }
alg1=(method.lam=paper method.scope=all method.bandwidth=median)  # Algorithm 1 + eq. 4
lane_a() {
  run method=mka method.pairing=most_similar_adjacent "${alg1[@]}" "$curve"
  run method=none
  run method=shortgpt "$curve"
  run method=reverse_prune method.keep_final=true "$curve"
}
lane_b() {
  run method=reverse_prune "$curve"
  run method=mka method.pairing=adjacent_back method.lam=code method.scope=linear \
    method.bandwidth=8 "$curve"                  # the public code's scheme, really merged
  run method=angular "$curve"
  run method=mka method.pairing=most_similar "${alg1[@]}" "$curve"
}
lane_a >"$out/lane_a.log" 2>&1 &
lane_b >"$out/lane_b.log" 2>&1 &
wait
