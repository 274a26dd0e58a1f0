"""Evaluation: score a model in memory with lm-evaluation-harness's tasks (shots, example draws,
per-example rows), through a backend Hydra builds from `conf/eval/*.yaml` (`_target_`).

    backend.py   settings every backend shares, their checks, the lm-eval run (`LMEvalBackend`)
    hf.py        the default backend: lm-eval's HFLM on the in-memory model (`HFEvaluation`)
    vllm.py      lm-eval's vLLM model class on a saved copy of the model (`eval=vllm`)
    harness.py   tasks: resolve, build once, draw examples, flatten results
    derived.py   tasks derived from lm-eval's own (`mmlu_val`: MMLU's validation split)
    checks.py    the settings' checks and the benchmark files' check, before the model loads
    rows.py      lm-eval's logged samples as per-example rows
    prefix_cache.py, prefix_tree.py   HFLM that runs each shared token prefix once
    reuse.py                   hidden states shared across models (`eval.reuse`)
    answers.py                 each model's answers kept as they come (`eval.answer_cache`)

A new backend is one module (a subclass of `LMEvalBackend` with its settings and `lm`) and one
yaml naming it. May import: `checks`, `choices`, `data`, `models` (saving, for vLLM). Imported by
the pipeline; `results` reads the row format.
"""
