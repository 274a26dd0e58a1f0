#!/usr/bin/env bash
# Issue-4 comparison on SmolLM2-135M: dense, reverse (both), shortgpt, angular and MKA variants at
# 4 and 8 of 30 layers removed, offline data. Each method walks both points in one process (curve).
#   bash benchmarks/compare_methods.sh [OUTPUT_ROOT] [LIMIT]   then: python -m mka_exp.report OUTPUT_ROOT
set -euo pipefail
out=${1:-outputs/compare_methods}
limit=${2:-200}
data=${MKA_EXP_DATA_ROOT:-../shared/benchmarks}
common=(logger=none "eval.tasks=[piqa,hellaswag]" eval.limit=$limit "data_root=$data" "paths.output_root=$out")
curve="curve=[0.13333,0.26667]"   # 4 and 8 of 30 layers
python run.py method=none "${common[@]}"
python run.py method=mka "$curve" "${common[@]}"
python run.py method=shortgpt "$curve" "${common[@]}"
python run.py method=reverse_prune "$curve" "${common[@]}"
python run.py method=mka method.pairing=adjacent_back method.lam=code method.scope=linear \
  method.bandwidth=8 "$curve" "${common[@]}"
python run.py method=angular "$curve" "${common[@]}"
python run.py method=mka method.pairing=most_similar "$curve" "${common[@]}"
python run.py method=reverse_prune method.keep_final=true "$curve" "${common[@]}"
