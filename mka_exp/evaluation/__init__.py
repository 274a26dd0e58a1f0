"""Evaluation: score a model in memory with lm-evaluation-harness (tasks, shots, example draws,
per-example outcomes) and run each shared token prefix once (`prefix_cache`).

May import: `checks`, `choices`, `data`, `results.samples`. Imported by the pipeline only.
"""
