"""Results: what a run leaves on disk and how it is found again — records keyed by config hash,
the results table, failures, claims that let sweeps share work, per-example samples, figures.

May import: `checks`, `choices`. Imported by the pipeline, the sweep callbacks and the report.
"""
