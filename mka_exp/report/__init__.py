"""Paper-style report from many runs: our numbers beside the paper's, as tables and figures.

    python -m mka_exp.report outputs/ [--out DIR] [--wandb]
    python -m mka_exp.report outputs/results.csv
    python -m mka_exp.report select-best OUTPUTS --task mmlu_val --into conf/compare/NAME.yaml

Reads the run table (an outputs dir is rebuilt from its `records/`, so it is always complete; a
CSV is read as is) and writes into `--out` (default `<outputs dir>/report`):

- `table1.{md,csv}`  model × method × quantizer → MMLU and compression ratio (paper Table 1)
- `table2.{md,csv}`  model × method × compression ratio → MMLU, PIQA, HellaSwag, RACE-H, BoolQ
- `table3_4.{md,csv}` model × method × retained layers → MMLU (paper Tables 3-4)
- `plots/curve_<model>.png`  accuracy vs compression ratio, one panel per task, one line per
  method and variant (Fig. 2)
- `heatmaps/*.png`  every `similarity_*.npy` found under the outputs dir (Fig. 3)
- `report.md`  an index of all of the above
- from an outputs dir, per-example records (`mka_exp.results.samples`) give `accuracy_intervals.csv`
  (95 % interval on every accuracy), `paired_differences.csv` (each compressed run minus the
  baseline: `--baseline METHOD`, default the best pruning run at the same layer count, chosen by
  cross-fitting; Newcombe or bootstrap interval, McNemar exact p, MDE),
  `declared_comparisons.csv` (the declared comparisons with Holm's p), `retained.csv` (each run
  at its model's layer cut(s) nearest 25 % as a share of dense, paired bootstrap interval; the
  document prints it beside published figures for other models), `distance_to_dense.csv`
  (flips and KL, for runs with per-choice log-likelihoods), `calibration_sensitivity.csv`,
  `one_answer.csv` (runs that give one answer to >= 90 % of a task: their accuracy there is a
  base rate) and `statistics.md`; `--markdown docs/method_comparison.md` writes the comparison
  document, its figures beside it in `figures/`

The package, by job: `loading` (runs, records, per-example rows), `tables` (the paper's tables),
`stats` (intervals, tests, Holm, power), `crossfit` (best-of baselines), `declared` (declared
comparisons), `selection` (`select-best`: the best pruning chosen beforehand on other questions),
`analysis` (the `Stats` of a report), `distance` (distance to the dense model),
`retained` (share of dense at the cuts nearest 25 %, and `literature.csv`: published figures),
`sensitivity` (one-answer runs, calibration seeds), `cells`/`sections`/`comparisons` (markdown),
`figures`, `document` (the comparison document), `cli`. Method facts (family, order, colour,
marker, variant keys) come from `mka_exp.methods.registry`.

Accuracies are in percent like the paper's; each `<task>_paper` column holds the published
number (`mka_exp/paper_results.csv`) where model, method, quantizer and ratio (or retained layers)
match. MMLU is the macro average over subjects when a run has it (the paper's script averaged per
subject), else lm-eval's group score. Runs of one method that differ in other settings (λ, pair
choice, calibration, ...) get a `variant` label built from the config keys that differ (of the
method's options, only its registry variant keys).

Floor 7, the top: may import anything below (it reads `results` and `methods.registry`); nothing
imports it.
"""
