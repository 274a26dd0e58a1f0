"""The contracts of the stages the pipeline runs, in one place: what a method, a repair, a
quantizer, an evaluation backend and a tracker must offer for the pipeline to drive them.

A run is: build every stage from its yaml (`_target_`), let each refuse bad settings, load the
model, then per point: `Method.compress` (or `LayerMethod.progressive` along a curve), then
`Repair.repair`, `Quantizer.quantize`, `EvaluationBackend.evaluate`, and the record goes to the
`Tracker`. A new option of a stage is one class that satisfies its protocol here, one module and
one yaml; `tests/test_contracts.py` checks every `_target_` under conf/ against these, by member
and parameter names, so a renamed method or argument fails there and not in a long run.

The classes need not inherit from these protocols (they are structural); a type checker holds
them where the pipeline annotates its fields with them. Floor 0: imports typing and the standard
library only; the types of torch, transformers and pandas are named under TYPE_CHECKING, and a
calibration set (`mka_exp.calibration.CalibrationSet`, a floor above) is written `Calibration`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, runtime_checkable

if TYPE_CHECKING:
    import pandas
    from torch import nn

# mka_exp.calibration.CalibrationSet (or None where a stage runs without calibration data).
Calibration: TypeAlias = Any
Tokenizer: TypeAlias = Any  # a transformers tokenizer (PreTrainedTokenizerBase)


@runtime_checkable
class Method(Protocol):
    """Compresses the loaded model in place (`conf/method/*.yaml`).

    Bad settings raise at construction, before the model loads. `compress` returns the method's
    stats for the record (`method_stats`); a method that removes layers lists their original
    indices in `removed_layers` (and merges in `merges`, each with the `keep` it merged into),
    which a repair and the pipeline's cut check read.
    """

    def compress(self, model: nn.Module, calib: Calibration) -> dict: ...


@runtime_checkable
class LayerMethod(Method, Protocol):
    """A method that removes or merges whole decoder layers (`mka_exp.methods.base.LayerMethod`
    implements `compress` on top of `progressive`).

    Exactly one of `ratio` (fraction of the layers) and `num_layers` is set. `progressive` walks
    ascending removal counts, yielding (count, stats) after each; `nested` says whether a longer
    cut extends a shorter one, so a curve can cut one model further (else each point compresses
    a fresh copy of the dense model).
    """

    ratio: float | None
    num_layers: int | None
    nested: bool

    def progressive(
        self, model: nn.Module, calib: Calibration, counts: list[int]
    ) -> Iterator[tuple[int, dict]]: ...


@runtime_checkable
class Repair(Protocol):
    """Training-free compensation between the method and the quantizer (`conf/repair/*.yaml`).

    `check_method` refuses a method it cannot follow before the model loads; `prepare` takes what
    it needs from the dense model (before the method runs; the pipeline skips it for no repair);
    `repair` changes the compressed model in place and returns the record's `repair_stats`.
    """

    def check_method(self, method: Method) -> None: ...

    def prepare(self, model: nn.Module, calib: Calibration) -> Any: ...

    def repair(
        self, model: nn.Module, calib: Calibration, method_stats: dict, dense: Any
    ) -> dict: ...


@runtime_checkable
class Quantizer(Protocol):
    """Post-training quantization of the compressed model (`conf/quant/*.yaml`).

    `bits` is the weight width for the paper's compression ratio (16 for none). `quantize` may
    change the model in place or return another (bitsandbytes reloads it); the stats go to the
    record's `quant_stats`.
    """

    bits: int

    def quantize(
        self, model: nn.Module, tokenizer: Tokenizer, calib: Calibration
    ) -> tuple[nn.Module, dict[str, Any]]: ...


@runtime_checkable
class EvaluationBackend(Protocol):
    """Scores a model on benchmark tasks (`conf/eval/*.yaml`).

    `check_data` reads the tasks' data (names, few-shot settings, benchmark files) and raises on
    a bad one before the model loads. `evaluate` returns the metrics by name and one row per
    scored example (the report's paired tests read those rows).
    """

    tasks: list[str]

    def check_data(self) -> None: ...

    def evaluate(
        self, model: nn.Module, tokenizer: Tokenizer
    ) -> tuple[dict[str, float], pandas.DataFrame]: ...


@runtime_checkable
class Tracker(Protocol):
    """Where a point's record goes besides the records folder (`conf/logger/*.yaml`).

    Tracking may fail (an unreachable server) without losing the record: a tracker degrades
    rather than raises. One tracker serves every point of a process: `start`, `log_record`,
    `finish` per point.
    """

    def start(self, config: dict, name: str, output_dir: Path) -> None: ...

    def log_record(self, record: dict[str, Any], images: dict[str, Path]) -> None: ...

    def finish(self) -> None: ...
