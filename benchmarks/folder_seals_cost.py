"""Benchmark: what sealing a local model folder costs on its first load, and what checking it
costs on every later one (`mka_exp.models.folder_seals`), on a real Hugging Face folder.

    python benchmarks/folder_seals_cost.py [FOLDER] [--repeats 3]

FOLDER defaults to the float32 copy of Qwen2.5-Coder-0.5B's GGUF in the model cache (2.5 GB).
The folder is only read: no file of it is touched, the seals go to a temporary MKA_EXP_CACHE,
and no model is loaded. The first seal hashes every file in full (the page cache decides whether
that reads the disk); each re-check reads 32 slices of each file (8 MiB of a large one).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

DEFAULT = "~/.cache/mka_exp/dequantized/qwen2.5-coder-0.5b-instruct-q4_k_m-3cf17ea1e3fa"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", default=DEFAULT, help="a model folder (read only)")
    parser.add_argument("--repeats", type=int, default=3, help="re-checks timed")
    opts = parser.parse_args()
    folder = Path(opts.folder).expanduser()
    os.environ["MKA_EXP_CACHE"] = tempfile.mkdtemp(prefix="folder_seals_")
    from mka_exp.models import folder_seals

    names = folder_seals.read_files(folder)
    size = sum((folder / name).stat().st_size for name in names)
    print(f"{folder}: {len(names)} files sealed, {size / 1e9:.2f} GB")
    start = time.perf_counter()
    folder_seals.check_local(str(folder), folder, reseal=False)
    print(f"first load (seal: full sha256 of each file): {time.perf_counter() - start:.2f} s")
    for _ in range(opts.repeats):
        start = time.perf_counter()
        folder_seals.check_local(str(folder), folder, reseal=False)
        print(
            f"later load (check: sizes, times, sampled digests): {time.perf_counter() - start:.3f} s"
        )


if __name__ == "__main__":
    main()
