"""No repair: the compressed model goes to the quantizer as the method left it (the default)."""

from __future__ import annotations


class NoRepair:
    def check_method(self, method) -> None:
        return None

    def prepare(self, model, calib) -> None:
        return None

    def repair(self, model, calib, method_stats: dict, dense) -> dict:
        return {}
