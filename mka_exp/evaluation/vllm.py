"""An evaluation backend on vLLM (`eval=vllm`): lm-eval's own vLLM model class
(`lm_eval.models.vllm_causallms.VLLM`) scores the compressed model, for a GPU cluster where
vLLM's paged attention and prefix caching make a full paper evaluation cheap.

Why through a folder: vLLM loads weights from disk, never a model object, so the compressed
model is saved (`models.saving.save_compressed`, as `save=true` does) to a temporary folder
that vLLM reads and that is removed after the evaluation. While vLLM holds the GPU the
in-memory model waits on the CPU (unless accelerate spread it over devices), then goes back.

Its settings are checked when Hydra builds it, before the model loads, and so is vLLM itself:
where it is not installed the run stops at once with one line saying how to install it.

    python run.py eval=vllm eval.gpu_memory_utilization=0.8 eval.max_model_len=4096
"""

from __future__ import annotations

import contextlib
import importlib.util
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from mka_exp.checks import check_positive, is_number
from mka_exp.evaluation.backend import LMEvalBackend

DTYPES = ("auto", "float16", "bfloat16", "float32")  # what lm-eval's VLLM accepts


@dataclass(kw_only=True)
class VLLMEvaluation(LMEvalBackend):
    """lm-eval's `VLLM` on a saved copy of the model. `gpu_memory_utilization`: the share of
    the GPU vLLM takes for weights and KV cache; `tensor_parallel_size`: GPUs per model;
    `max_model_len`: context length (null: the model's); `dtype`: weights as vLLM runs them."""

    batch_size: int | str = "auto"
    gpu_memory_utilization: float = 0.8
    tensor_parallel_size: int = 1
    max_model_len: int | None = None
    dtype: str = "auto"

    def setting_checks(self) -> list[Callable[[], Any]]:
        own = [self.check_installed, self.check_memory, self.check_parallel, self.check_length]
        return [*super().setting_checks(), *own, self.check_dtype]

    def check_installed(self) -> None:
        if importlib.util.find_spec("vllm") is None:
            raise ValueError(
                "eval=vllm: vLLM is not installed in this environment; allowed: pip install vllm "
                "(on a CUDA machine), or another eval backend (eval=quick)"
            )

    def check_memory(self) -> None:
        share = self.gpu_memory_utilization
        if not is_number(share) or not 0 < share <= 1:
            raise ValueError(
                f"eval.gpu_memory_utilization={share!r}: allowed a number in (0, 1] (the share "
                "of GPU memory vLLM takes)"
            )

    def check_parallel(self) -> None:
        check_positive("eval.tensor_parallel_size", self.tensor_parallel_size)

    def check_length(self) -> None:
        if self.max_model_len is not None:
            check_positive("eval.max_model_len", self.max_model_len)

    def check_dtype(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"eval.dtype={self.dtype!r}: allowed {', '.join(DTYPES)}")

    @contextlib.contextmanager
    def lm(self, model: Any, tokenizer: Any) -> Iterator[Any]:
        from lm_eval.models.vllm_causallms import VLLM

        from mka_exp.models.saving import save_compressed

        with tempfile.TemporaryDirectory(prefix="mka_vllm_") as folder, on_cpu(model):
            save_compressed(model, tokenizer, folder)
            lm = VLLM(
                pretrained=folder,
                tokenizer=folder,
                dtype=self.dtype,
                batch_size=self.batch_size,
                max_model_len=self.max_model_len,
                tensor_parallel_size=self.tensor_parallel_size,
                gpu_memory_utilization=self.gpu_memory_utilization,
                seed=self.seed,
            )
            try:
                yield lm
            finally:
                release(lm)


@contextlib.contextmanager
def on_cpu(model: Any) -> Iterator[None]:
    """The model on the CPU while vLLM holds the GPU, back on its device afterwards; a model
    accelerate spread over devices (`hf_device_map`) stays where it is."""
    import torch

    device = next(model.parameters()).device
    if getattr(model, "hf_device_map", None) or device.type == "cpu":
        yield
        return
    model.to("cpu")
    torch.cuda.empty_cache()
    try:
        yield
    finally:
        model.to(device)


def release(lm: Any) -> None:
    """Free vLLM's engine and its GPU memory, so a curve's next point can start its own."""
    import gc

    import torch

    with contextlib.suppress(AttributeError):
        del lm.model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
