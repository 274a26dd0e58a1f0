#!/usr/bin/env bash
# The GPU check in one command (benchmarks/gpu_check.py says what it runs and writes):
#   bash benchmarks/gpu_check.sh [--out DIR] [--steps install,pytest,analysis,quantize,throughput]
# On the device machine $OUT is set and is the default --out. The whole check is capped by
# `timeout` at GPU_CHECK_TIMEOUT seconds (default 470), inside the device call's 480 s;
# each step has its own, smaller limit.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1
exec timeout --kill-after=10 "${GPU_CHECK_TIMEOUT:-470}" "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
