#!/usr/bin/env bash
# The evidence comparisons of issues 13 and 14, resumable across sessions: every finished point is
# a record under OUT/records (kept in git under docs/evidence/NAME), so rerunning the same command
# skips what is done and computes only what is missing. Two lanes, one torch thread each.
#
#   bash benchmarks/evidence.sh NAME [OUT]        NAME: qwen15b_mmlu | qwen05b_tasks | smollm2_tasks
#                                                       | smollm2_seeds | smollm2_distance
#                                                       | qwen15b_declared_select
#   CURVE="[0.13333]" bash benchmarks/evidence.sh smollm2_tasks   only these points of every curve
#   python -m mka_exp.report OUT --markdown docs/method_comparison.md
#
# qwen15b_mmlu   Qwen2.5-Coder-1.5B (28 layers), MMLU 0-shot, 3 questions per subject (171), 4 and 8
#                layers removed: dense, shortgpt, mka Algorithm 1, mka defaults, reverse_prune;
#                then the best pruning and merging variants at 4 layers with repair=linear, and
#                LaCo (m=1) at 4 layers.
# qwen05b_tasks  Qwen2.5-Coder-0.5B (24 layers), piqa/hellaswag/race/boolq 0-shot, 300 each, 4 and
#                8 removed: every layer method with repair=none and repair=linear.
# smollm2_tasks  SmolLM2-135M (30 layers), the same tasks and methods, 4 and 8 removed.
# smollm2_seeds  Calibration sensitivity: shortgpt, angular and MKA Algorithm 1 at 4 of 30 layers
#                with calib.seed=0,1,2 (which validation question of each subject calibrates),
#                piqa 300 (the same first 300 as smollm2_tasks, so its records pair with those).
# smollm2_distance  Distance to dense (issue 27): SmolLM2-135M, piqa and hellaswag 0-shot, the
#                first 300 each (as smollm2_tasks), per-choice log-likelihoods in every record:
#                dense, reverse_prune, shortgpt, angular and mka defaults at 4 and 8 of 30 layers.
# qwen15b_declared_select  Issue 28, phase 1 (conf/experiment/qwen15b_declared_select.yaml, declared
#                before it ran): every pruning method at 4 and 7 of 28 Qwen2.5-Coder-1.5B layers on
#                943 MMLU validation questions (20 per subject, sample_seed 28), with eval.reuse
#                (same scores) and the caches (SLEB's search, the reuse store: ~6 GB) under
#                CACHE_DIR (default outputs/qwen15b_cache; never under docs/). Then select-best.
# LANES=1 runs the points one after another (default 2 lanes side by side; a method's points with
# either repair share a lane, so the second replays the first's cached search or activations).
# ONLY=REGEX keeps the points whose overrides match it (grep -E), e.g. ONLY=sleb, so two
# invocations can share out one NAME without computing the same point twice.
# A curve point is the same record as the single run at its ratio, so CURVE can take the cheap
# points first and the full curves resume from them later (sleb is last: its search is the costliest).
# Measured here (one thread each, 2-core box): Qwen-1.5B MMLU 0-shot dense 756 s per evaluation;
# SmolLM2 four tasks x 300, 723 s per evaluation; Qwen-0.5B four tasks x 300, 1,320-1,524 s
# (two lanes); SLEB's search for 4 of 30 SmolLM2 layers, 3,025 s (two lanes; one full pass per
# candidate, before the walk), its next four steps 1,837 s; for 4 of 24 Qwen-0.5B layers, 6,675 s.
# A new checkout has the records but not the cache: `python -m mka_exp.seed_cache RECORD.json`
# rebuilds a SLEB record's search cache, so its other repair or a longer cut replays that search.
set -euo pipefail
name=${1:?usage: bash benchmarks/evidence.sh NAME [OUT]}
out=${2:-docs/evidence/$name}
data=${MKA_EXP_DATA_ROOT:-../shared/benchmarks}
export OMP_NUM_THREADS=1
alg1="method=mka method.pairing=most_similar method.lam=paper method.scope=all"
# LaCo merges 2 layers into 1 here: the paper's 4 into 1 (m=3) leaves SmolLM2's final states at
# cosine 0.01-0.03 to the dense model's at layers 8, 14, 20 and 26 (dropping the same 3 layers:
# 0.47-0.93), so no candidate passes the threshold and every merge would be a fallback below it.
laco="method.m=1"
tasks4=(logger=none "eval.tasks=[piqa,hellaswag,race,boolq]" eval.limit=300)
layer_methods() {  # every layer method at the curve $1, each with repair=none and repair=linear
  local m
  for m in "method=shortgpt" "method=mka" "$alg1" "method=reverse_prune" "method=angular" \
    "method=reverse_prune method.keep_final=true" "method=laco $laco" "method=sleb"; do
    echo "$m curve=${CURVE:-$1} repair=none"
    echo "$m curve=${CURVE:-$1} repair=linear"
  done
}
case $name in
  qwen15b_mmlu)
    common=(model=qwen25_coder_15b eval=mmlu eval.num_fewshot.mmlu=0 eval.limit=3 logger=none)
    c=${CURVE:-"[0.142857,0.285714]"}  # 4 and 8 of 28
    points=("method=none" "method=shortgpt curve=$c" "$alg1 curve=$c" "method=mka curve=$c"
      "method=reverse_prune curve=$c"
      # issue 14: the best pruning (reverse_prune) and merging (mka defaults) at 4 layers,
      # repaired; then ShortGPT repaired (it lost most to its cut, so it may gain most)
      "method=reverse_prune curve=[0.142857] repair=linear" "method=mka curve=[0.142857] repair=linear"
      "method=shortgpt curve=[0.142857] repair=linear"
      # the other published merging method, at 4 layers, after the rest
      "method=laco $laco curve=[0.142857]") ;;
  qwen05b_tasks)
    common=(model=qwen25_coder_05b "${tasks4[@]}")
    mapfile -t rest < <(layer_methods "[0.166667,0.333333]")  # 4 and 8 of 24
    points=("method=none" "${rest[@]}") ;;
  smollm2_tasks)
    common=(model=smollm2_135m "${tasks4[@]}")
    mapfile -t rest < <(layer_methods "[0.13333,0.26667]")  # 4 and 8 of 30
    points=("method=none" "${rest[@]}") ;;
  smollm2_seeds)
    common=(model=smollm2_135m logger=none "eval.tasks=[piqa]" eval.limit=300)
    points=("method=none")
    for m in "method=shortgpt" "method=angular" "$alg1"; do
      for seed in 0 1 2; do points+=("$m method.ratio=0.13333 calib.seed=$seed"); done
    done ;;
  smollm2_distance)
    common=(model=smollm2_135m logger=none "eval.tasks=[piqa,hellaswag]" eval.limit=300)
    c=${CURVE:-"[0.13333,0.26667]"}  # 4 and 8 of 30
    points=("method=none")
    for m in reverse_prune shortgpt angular mka; do points+=("method=$m curve=$c"); done ;;
  qwen15b_declared_select)
    cache=${CACHE_DIR:-outputs/qwen15b_cache}
    # eval.reuse is on by default (under paths.cache_dir); its layers and bound are the yaml's
    common=(experiment=qwen15b_declared_select "paths.cache_dir=$cache")
    points=()
    # SLEB searches on 1,000 of the calibration's tokens (the yaml's own command line for it)
    for m in reverse_prune shortgpt angular "sleb method.search_tokens=1000"; do
      for k in 4 7; do points+=("method=$m method.num_layers=$k method.ratio=null"); done
    done ;;
  *) echo "evidence.sh: unknown NAME '$name' (qwen15b_mmlu, qwen05b_tasks, smollm2_tasks," \
      "smollm2_seeds, smollm2_distance, qwen15b_declared_select)" >&2
    exit 2 ;;
esac
if [[ -n ${ONLY:-} ]]; then
  mapfile -t points < <(printf '%s\n' "${points[@]}" | grep -E -- "$ONLY" || true)
  ((${#points[@]})) || { echo "evidence.sh: ONLY='$ONLY' matches no point of $name" >&2; exit 2; }
fi
mkdir -p "$out"
lanes=${LANES:-2}
# A method's points (either repair; for qwen15b_declared_select, either cut) share a lane, one
# after the other: the later replay what the first cached (SLEB's search, MKA's activations)
# instead of computing it at the same time.
declare -A lane_of
key_of() {  # a point's lane key: its method (its cuts and repairs share the method's lane)
  local key=${1% repair=*}
  echo "${key% method.num_layers=*}"
}
methods=0
for point in "${points[@]}"; do
  key=$(key_of "$point")
  [[ -n ${lane_of[$key]:-} ]] || lane_of[$key]=$((methods++ % lanes + 1))
done
lane() {  # lane $1 of $lanes: its methods' points in list order (the dense point in lane 1)
  local i
  for i in "${!points[@]}"; do
    ((${lane_of[$(key_of "${points[i]}")]} == $1)) || continue
    echo "=== $(date +%T) ${points[i]}"
    # shellcheck disable=SC2086  # a point is several overrides
    python run.py ${points[i]} "${common[@]}" "data_root=$data" "paths.output_root=$out" ||
      echo "=== failed: ${points[i]}"
  done
}
lane 1 >>"$out/lane_a.log" 2>&1 &
if ((lanes > 1)); then lane 2 >>"$out/lane_b.log" 2>&1 & fi
wait
