"""Rebuild SLEB's search cache from finished records, so a new checkout replays their searches.

    python -m mka_exp.seed_cache docs/evidence/qwen05b_tasks/records/1bc811b881ce0102.json [...]

SLEB's cache (one file of candidate perplexities per removal step) is what lets a run with another
repair or quantizer, or a longer curve, replay a search of hours instead of repeating it. The cache
is git-ignored, the records are not: a record of a SLEB run holds every step's candidates and
their perplexities, so this loads the record's model and calibration set as its run did and writes
the entries that run would have left behind. The keys are computed from the loaded model and data,
so an entry is only ever used by a run on the same model and calibration set.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from hydra.utils import instantiate

log = logging.getLogger("mka_exp.seed_cache")


def seed_from_record(path: Path) -> list[Path]:
    """Write the cache entries of the SLEB record at `path`; returns their paths."""
    record = json.loads(path.read_text())
    if record.get("method") != "sleb":  # the record's method name, as `method=` chose it
        raise ValueError(f"{path}: method {record.get('method')!r} is not sleb; nothing to seed")
    config = record["config"]
    method = instantiate(config["method"])
    loaded = instantiate(config["model"])
    calib = instantiate(config["calib"], tokenizer=loaded.tokenizer)
    return method.seed_cache(loaded.model, calib, record["method_stats"]["steps"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records", nargs="+", type=Path, help="records (.json) of SLEB runs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for path in args.records:
        for entry in seed_from_record(path):
            log.info("%s: wrote %s", path.name, entry)


if __name__ == "__main__":
    main()
