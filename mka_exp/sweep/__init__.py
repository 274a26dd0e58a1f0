"""Sweeps: Hydra callbacks around multirun (the output-root check before any job, the failure
summary, deferred points) and the Slurm `squeue` fallback for clusters without accounting.

The top floor beside `run.py`: may import anything; nothing but `mka_exp/__init__` imports it.
"""
