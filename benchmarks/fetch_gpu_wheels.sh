#!/usr/bin/env bash
# Fill the git-ignored folder that the GPU check carries to the device machine:
#   <dir>/wheels/*.whl   what the device image lacks, cp312 manylinux x86_64 (py3-none-any where pure)
#   <dir>/requirements.txt  the top-level pins gpu_check.py installs (pip resolves the rest
#                        from <dir>/wheels and the image, --no-index)
#   <dir>/data/baber/piqa/default/validation.jsonl  the first $PIQA_ROWS piqa rows (offline
#                        mirror layout, read by lm-eval through data_root)
# and print the size that travels (this folder + the working tree) against the 64 MiB limit.
#
#   bash benchmarks/fetch_gpu_wheels.sh [dir]        # default dir: .gpu_wheels (git-ignored)
#   DATA_ROOT=../shared/benchmarks PIQA_ROWS=50 PYTHON=python3 bash benchmarks/fetch_gpu_wheels.sh
#   SLIM_BNB=1 bash benchmarks/fetch_gpu_wheels.sh   # over 64 MiB: bitsandbytes with its CPU and
#                                                    # CUDA 13 libraries only (41 -> ~4 MiB)
#
# Idempotent: a wheel already in the folder is not fetched again; the piqa rows are rewritten.
#
# The list below is the dependency closure of lm-eval, hydra-core, llm-compressor (with the
# compressed-tensors it pins), datasets, gguf and bitsandbytes, minus what the device image
# already has (KINDS.md's package list: torch 2.11, transformers 5.17, accelerate 1.15, peft,
# pandas, pyarrow, scikit-learn, sacrebleu, huggingface-hub, fsspec, xxhash, pyyaml, ...), at
# the versions this project's venv runs its tests with. Four are sdists on PyPI (pure Python):
# they are built into py3-none-any wheels here. wandb (~20 MB) and submitit are left out: the
# check never logs online nor submits jobs. bitsandbytes 0.50.2 ships libbitsandbytes_cuda130.so
# for the image's CUDA 13.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DIR="${1:-.gpu_wheels}"
PYTHON="${PYTHON:-python3}"
DATA_ROOT="${DATA_ROOT:-$ROOT/../shared/benchmarks}"
PIQA_ROWS="${PIQA_ROWS:-50}"
LIMIT_MIB=64

TOP_LEVEL=(
  "lm_eval==0.4.13"
  "hydra-core==1.3.8"
  "llmcompressor==0.14.0.1"
  "compressed-tensors==0.19.0"
  "datasets==5.2.0"
  "gguf==0.19.0"
  "bitsandbytes==0.50.2"
)
BINARY=(
  annotated-types==0.8.0 auto-round==0.15.1 bitsandbytes==0.50.2 chardet==6.0.0.post1
  compressed-tensors==0.19.0 dataproperty==1.1.1 datasets==5.2.0 defusedxml==0.7.1 dill==0.4.1
  evaluate==0.4.6 gguf==0.19.0 hydra-core==1.3.8 llmcompressor==0.14.0.1 lm-eval==0.4.13
  loguru==0.7.3 mbstrdecoder==1.1.5 more-itertools==11.2.1 multiprocess==0.70.19 nltk==3.10.4
  omegaconf==2.3.1 pathvalidate==3.3.1 pydantic==2.14.4 pydantic-core==2.50.5
  pytablewriter==1.2.1 pytz==2026.6 tabledata==1.3.5 tcolorpy==0.1.7 typepy==1.3.5
  typing-inspection==0.4.5
)
SDIST=(antlr4-python3-runtime==4.9.3 rouge-score==0.1.2 sqlitedict==2.1.0 word2number==1.1)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64
  manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)

mkdir -p "$DIR/wheels"
if ! git check-ignore -q "$DIR"; then
  echo "fetch_gpu_wheels.sh: $DIR is not git-ignored; add it to .gitignore first" >&2
  exit 2
fi

# wheel file names normalise '-' and '.' to '_' and may change case
have() {
  local name="${1%%==*}" version="${1##*==}"
  name="$(echo "$name" | tr 'A-Z.-' 'a-z__')"
  compgen -G "$DIR/wheels/${name}-${version}-*.whl" >/dev/null ||
    compgen -G "$DIR/wheels/$(echo "$name" | sed 's/_/-/g')-${version}-*.whl" >/dev/null
}

platform_args=()
for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done
missing=()
for spec in "${BINARY[@]}"; do have "$spec" || missing+=("$spec"); done
if ((${#missing[@]})); then
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platform_args[@]}" -d "$DIR/wheels" "${missing[@]}"
fi
for spec in "${SDIST[@]}"; do
  have "$spec" || "$PYTHON" -m pip wheel -q --no-deps -w "$DIR/wheels" "$spec"
done
printf '%s\n' "${TOP_LEVEL[@]}" >"$DIR/requirements.txt"

# The bitsandbytes wheel holds a library per CUDA / ROCm / XPU version (41 MiB); the image's
# torch is CUDA 13.0. SLIM_BNB=1 keeps the CPU and CUDA 13.x ones and drops the others from the
# wheel and its RECORD (pip does not check RECORD hashes; the kept files are unchanged).
if [[ "${SLIM_BNB:-0}" == 1 ]]; then
  "$PYTHON" - "$DIR"/wheels/bitsandbytes-*.whl <<'PY'
import os, re, sys, zipfile
path = sys.argv[1]
keep = re.compile(r"libbitsandbytes_(cpu|cuda13\d)\.so$")
drop = lambda name: "libbitsandbytes_" in name and not keep.search(name)
with zipfile.ZipFile(path) as src:
    names = src.namelist()
    if any(map(drop, names)):
        tmp = path + ".slim.tmp"
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
            for info in src.infolist():
                if drop(info.filename):
                    continue
                data = src.read(info)
                if info.filename.endswith(".dist-info/RECORD"):
                    lines = data.decode().splitlines(keepends=True)
                    data = "".join(l for l in lines if not drop(l.split(",")[0])).encode()
                dst.writestr(info, data)
        os.replace(tmp, path)
        print(f"slimmed {os.path.basename(path)} to {os.path.getsize(path) / 2**20:.1f} MiB")
PY
fi

src="$DATA_ROOT/baber/piqa/default/validation.jsonl"
dst="$DIR/data/baber/piqa/default"
mkdir -p "$dst"
head -n "$PIQA_ROWS" "$src" >"$dst/validation.jsonl.tmp"
mv "$dst/validation.jsonl.tmp" "$dst/validation.jsonl"

expected=$((${#BINARY[@]} + ${#SDIST[@]}))
count=$(find "$DIR/wheels" -name '*.whl' | wc -l)
if ((count != expected)); then
  echo "fetch_gpu_wheels.sh: $count wheels in $DIR/wheels, expected $expected (one per pin):" >&2
  ls "$DIR/wheels" >&2
  exit 1
fi
carried=$(du -sb "$DIR" | cut -f1)
tree=$( (git ls-files -z; git ls-files -z --others --exclude-standard) |
  xargs -0 -r stat -c %s -- 2>/dev/null | awk '{s += $1} END {print s + 0}')
total=$((carried + tree))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "$DIR: $count wheels + $PIQA_ROWS piqa rows = $(mib "$carried"); working tree $(mib "$tree")"
echo "travels with carry=[\"$DIR\"]: $(mib "$total") of the ${LIMIT_MIB} MiB limit"
if ((total > LIMIT_MIB * 1048576)); then
  echo "over the limit: split the check in two calls (see benchmarks/README.md, GPU check)" >&2
  exit 1
fi
