"""Results: what a run leaves on disk and how it is found again — records keyed by config hash,
the results table, failures, claims that let sweeps share work, per-example samples, figures.

By job: `files` (atomic writes, locks, a full disk named), `records` (config hash, records and
failures), `table` (results.csv, derived from the records), `claims`, `samples`, `plots`.

May import: `checks`, `choices`. Imported by the pipeline, the sweep callbacks and the report.
"""
