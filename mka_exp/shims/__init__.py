"""Library workarounds, each a small named shim apart from the logic it serves.

One module per library (`llmcompressor.py`: running llm-compressor's `oneshot` on an in-memory
model; `lm_eval.py`: lm-eval's logging and bars around an in-memory model, its re-processed
documents; `hydra.py`: a full disk in Hydra's own writes of a sweep job). Floor 1: a shim imports torch and the library it adapts, never a stage; the stages
(methods, quantizers, ...) import the shims.
"""
