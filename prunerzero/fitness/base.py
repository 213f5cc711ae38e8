"""The evaluator interface: the search hands over trees and gets fitnesses back.

The search knows nothing of models. Fitness is a number to minimise (perplexity for the model
evaluators); a tree that cannot be evaluated gets :data:`WORST_FITNESS` and a recorded reason.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from prunerzero.primitives.tree import Tree

# Finite so that checkpoints stay strict JSON; far above any perplexity a real metric reaches.
WORST_FITNESS = 1e12


@dataclass
class FitnessResult:
    fitness: float
    reason: str | None = None  # why the tree got the worst fitness, if it did
    mask_key: str | None = None  # hash of the masks the tree induced, when known
    seconds: float = 0.0
    cached: str | None = None  # "mask" when the fitness came from an identical earlier mask set
    timings: dict[str, float] | None = None  # seconds spent in score+mask, apply/restore, forward
    budget: int | None = None  # fidelity units (token windows) used; None = the full budget
    low_fitness: float | None = None  # multi-fidelity: the fitness on the low budget
    estimated: bool | None = None  # multi-fidelity: not promoted; fitness extrapolated from the low budget

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "FitnessResult":
        return cls(**d)

    @classmethod
    def worst(cls, reason: str, seconds: float = 0.0) -> "FitnessResult":
        return cls(WORST_FITNESS, reason=reason, seconds=seconds)


def mask_cache_key(mask_key: str, budget: int | None) -> str:
    """Key of the mask-level cache: a mask set's fitness depends on the budget it was measured on."""
    return mask_key if budget is None else f"{mask_key}@{budget}"


def is_full_budget_key(key: str) -> bool:
    """Whether a :func:`mask_cache_key` names a fitness measured on the full budget."""
    return "@" not in key


class Evaluator(ABC):
    """Evaluates batches of trees. Implementations: in-process, Ray actor pool, and cheap ones
    used by tests. ``fingerprint`` describes what the fitness means (resume refuses a change).

    ``budget`` is the fidelity: how many of the evaluator's fitness units (token windows for the
    model evaluators) to measure on, a prefix of the full set; None means all of them."""

    full_budget: int | None = None  # number of fitness units of a full evaluation, when known

    @abstractmethod
    def evaluate(self, trees: Sequence[Tree], budget: int | None = None) -> list[FitnessResult]: ...

    def remember(self, mask_fitness: dict[str, float]) -> None:
        """Seed the mask-level cache with fitnesses known from earlier generations (resume)."""

    def close(self) -> None:
        """Release workers and memory."""

    def __enter__(self) -> "Evaluator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
