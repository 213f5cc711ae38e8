"""The evaluator interface: the search hands over trees and gets fitnesses back.

The search knows nothing of models. Fitness is a number to minimise (perplexity for the model
evaluators); a tree that cannot be evaluated gets :data:`WORST_FITNESS` and a recorded reason.
"""

from __future__ import annotations

import logging
import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Iterator, Sequence, TypeVar

import torch

from prunerzero.primitives.tree import Tree
from prunerzero.pruning.equivalence import same_masks, synthetic_probes
from prunerzero.pruning.masks import Pattern

log = logging.getLogger(__name__)

# Finite so that checkpoints stay strict JSON; far above any perplexity a real metric reaches.
WORST_FITNESS = 1e12
PROGRESS_EVERY_S = 30.0  # a line at most this often while a batch is evaluated

T = TypeVar("T")


def with_progress(trees: Sequence[T]) -> Iterator[T]:
    """The trees of a batch, one by one, with a line every 30 s: a long batch shows it is moving
    (generation 0 of a real search is minutes of silence otherwise)."""
    start = last = time.monotonic()
    for done, tree in enumerate(trees):
        if done and time.monotonic() - last > PROGRESS_EVERY_S:
            last = time.monotonic()
            log.info("%d/%d trees of this batch evaluated (%.1f s each)", done, len(trees), (last - start) / done)
        yield tree


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
    window_losses: tuple[float, ...] | None = None  # mean loss of each fitness window, when measured here

    @classmethod
    def worst(cls, reason: str, seconds: float = 0.0) -> "FitnessResult":
        return cls(WORST_FITNESS, reason=reason, seconds=seconds)

    @classmethod
    def measured(cls, fitness: float, **kw: Any) -> "FitnessResult":
        """A measured fitness, or the worst with the reason when it is NaN or infinite: NaN never
        compares as the worst, so one NaN would survive every selection."""
        if not math.isfinite(fitness):
            return cls(WORST_FITNESS, reason=f"the fitness measured was {fitness} (not a finite number)",
                       mask_key=kw.get("mask_key"), seconds=kw.get("seconds", 0.0))
        return cls(min(float(fitness), WORST_FITNESS), **kw)


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
    pattern: str = "unstructured"  # the pattern masks are made with (simplification checks use it)
    mask_group: str = "row"  # where scores are compared ("tensor": an OBS block's whole ranking)
    _probes: list[dict[str, torch.Tensor]] | None = None

    @abstractmethod
    def evaluate(self, trees: Sequence[Tree], budget: int | None = None) -> list[FitnessResult]: ...

    # Asynchronous use (the steady state with ``search.in_flight``): trees are submitted one at a
    # time and their results collected as they finish. This default evaluates each queued tree
    # when results are asked for, in submission order; the Ray pool overrides both and keeps every
    # worker busy.
    _submitted: dict[int, Tree] | None = None
    _next_ticket: int = 0

    def submit(self, tree: Tree) -> int:
        """Queue a tree on the full budget; returns its ticket."""
        if self._submitted is None:
            self._submitted = {}
        ticket, self._next_ticket = self._next_ticket, self._next_ticket + 1
        self._submitted[ticket] = tree
        return ticket

    def wait_any(self) -> dict[int, FitnessResult]:
        """Results of submitted trees (ticket -> result): at least one, blocking until then."""
        if not self._submitted:
            raise RuntimeError("wait_any() with no tree submitted")
        ticket = min(self._submitted)
        return {ticket: self.evaluate([self._submitted.pop(ticket)])[0]}

    def drop_submitted(self) -> None:
        """Forget every submitted tree whose result was not collected (a search that stops)."""
        self._submitted = {}

    def probe_statistics(self) -> list[dict[str, torch.Tensor]]:
        """Statistics on which simplifications are checked: realistic synthetic ones by default;
        evaluators that hold a model give rows of its own."""
        return synthetic_probes()

    def same_ranking(self, a: Tree, b: Tree) -> bool:
        """Whether two trees prune alike with this evaluator's pattern (the search's OOS check)."""
        if self._probes is None:
            self._probes = self.probe_statistics()
        return same_masks(a, b, self._probes, Pattern.parse(str(self.pattern)), group=self.mask_group)

    def remember(self, mask_fitness: dict[str, float]) -> None:
        """Seed the mask-level cache with fitnesses known from earlier generations (resume)."""

    def close(self) -> None:
        """Release workers and memory."""

    def __enter__(self) -> "Evaluator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
