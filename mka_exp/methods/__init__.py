"""Compression methods: one module per method, one `conf/method/<name>.yaml` each.

Every method is a class built by Hydra from its yaml with `compress(model, calib) -> dict`:
it changes the model in place and returns what the run record should say about it.
"""
