"""Compression methods: one module per method, one `conf/method/<name>.yaml` each.

Every method is a class built by Hydra from its yaml with `compress(model, calib) -> dict` (the
`Method` contract in `mka_exp.contracts`; layer methods keep `LayerMethod` there, built on
`base.LayerMethod`): it changes the model in place and returns what the run record should say
about it. `registry.py` says what the report needs to know of each.

Floor 3, a stage: a method imports `base.py`, `registry.py` and the floors below (layers and their
hooks, activations, calibration, manifold, shims), never another method module or another stage.
"""
