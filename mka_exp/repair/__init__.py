"""Repair: training-free compensation applied after a layer method and before the quantizer.

One module per option, one `conf/repair/<name>.yaml` each (`none.py` ↔ `repair/none.yaml` ↔
`NoRepair`, `linear.py` ↔ `repair/linear.yaml` ↔ `LinearRepair`); `fit.py` (the closed-form
math) and `dense_states.py` (the dense model's boundary states, kept across runs with
`repair.reuse`) are no options but what `linear.py` uses. A repair (the `Repair` contract in `mka_exp.contracts`) has

* `check_method(method)`: refuses a method it cannot follow, before the model loads;
* `prepare(model, calib)`: what it needs from the *dense* model (called before the method runs);
* `repair(model, calib, method_stats, dense) -> dict`: changes the compressed model in place and
  returns what the run record says about it (`record["repair_stats"]`).

It reads which original layers each kept layer stands for from the method's stats:
`removed_layers` (original indices) and, for merging methods, `merges` (each with the original
index of the layer that was kept, `keep`).

Floor 3, a stage: imports the floors below (layers, calibration, activations, contracts,
fingerprints, state_store), never another stage (methods, quantizers, evaluation).
"""
