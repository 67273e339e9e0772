"""A target method that exists only for tests: the whole of a new method is this file (no registration beyond
its class_path in a config). Targets are the current block-L state at each request's fact token plus a fixed
shift along one hidden direction: no optimisation, so the write is predictable."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lit_edit.editing import FactColumns
from lit_edit.methods import TargetMethod
from lit_edit.targets import TargetResult


@dataclass
class FixedTargets(TargetMethod):
    shift: float = 1.0  # added to hidden unit `unit` of every target
    unit: int = 0

    def columns(self, writes: list) -> FactColumns:
        return FactColumns(self.env.tok, writes, self.env.context, "subject_first")

    def optimise(self, columns: FactColumns, own: list[int]) -> TargetResult:
        e = self.env
        H = columns.states(e.llm, e.layout, e.layers[-1])[own]
        delta = torch.zeros_like(H)
        delta[:, self.unit] = self.shift
        zero = torch.zeros(len(own), dtype=H.dtype)
        return TargetResult(H + delta, H, delta, zero, zero, torch.zeros(len(own), dtype=torch.long), [])
