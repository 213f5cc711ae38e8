"""Multi-fidelity fitness: every candidate on a small budget, only the promising on the full one.

One rung of successive halving per batch. All new trees of a batch are measured on the first
``low_budget`` fitness units (token windows); the best ``promote`` fraction of those that could be
ranked are measured again on the full budget. The others keep an *estimated* fitness: their
low-budget value times the largest full/low ratio seen among the promoted trees of the batch.
That estimate keeps the order of the low rung among them and never ranks an unpromoted tree above
a promoted one of the same batch, which is all that selection needs. Estimated fitnesses are
marked (``estimated``) and never enter the hall of fame, so every exported metric was measured on
the full budget.

The low budget is a prefix of the full one, so the two measurements share their first windows.
``benchmarks/fitness.py --fidelity`` reports how well the two budgets agree (Spearman).
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

from prunerzero.errors import UserError
from prunerzero.fitness.base import WORST_FITNESS, Evaluator, FitnessResult
from prunerzero.primitives.tree import Tree

log = logging.getLogger(__name__)


class MultiFidelityEvaluator(Evaluator):
    """Wraps an evaluator that accepts a budget (in-process or Ray)."""

    def __init__(self, inner: Evaluator, low_budget: int, promote: float):
        full = inner.full_budget
        if full is None:
            raise UserError("multi-fidelity needs an evaluator with a known full budget")
        if not 0 < low_budget < full:
            raise UserError(f"multi_fidelity.low_windows {low_budget} must be between 1 and fitness.windows - 1 "
                            f"({full - 1}); raise fitness.windows or lower low_windows")
        if not 0.0 < promote <= 1.0:
            raise UserError(f"multi_fidelity.promote {promote} must be a fraction in (0, 1]")
        self.inner, self.low_budget, self.promote = inner, low_budget, promote
        self.full_budget = full
        self.promoted = 0  # trees measured on both budgets
        self.stopped_low = 0  # trees measured on the low budget only (full evaluations saved)

    def evaluate(self, trees: Sequence[Tree], budget: int | None = None) -> list[FitnessResult]:
        if budget is not None:  # a caller that asks for one budget gets exactly that
            return self.inner.evaluate(trees, budget)
        low = self.inner.evaluate(trees, self.low_budget)
        rankable = [i for i, r in enumerate(low) if r.reason is None]
        rankable.sort(key=lambda i: low[i].fitness)
        n_up = min(len(rankable), math.ceil(self.promote * len(rankable)))
        up = rankable[:n_up]
        full = dict(zip(up, self.inner.evaluate([trees[i] for i in up]))) if up else {}

        ratios = [full[i].fitness / low[i].fitness for i in up
                  if full[i].reason is None and low[i].fitness > 0 and math.isfinite(full[i].fitness)]
        scale = max(ratios, default=1.0)
        out = []
        for i, r in enumerate(low):
            if i in full:
                f = full[i]
                out.append(FitnessResult(f.fitness, reason=f.reason, mask_key=f.mask_key or r.mask_key,
                                         seconds=r.seconds + f.seconds, cached=f.cached, timings=f.timings,
                                         low_fitness=r.fitness))
            elif r.reason is not None:
                out.append(r)
            else:
                out.append(FitnessResult(min(r.fitness * scale, WORST_FITNESS), mask_key=r.mask_key,
                                         seconds=r.seconds, cached=r.cached, budget=self.low_budget,
                                         low_fitness=r.fitness, estimated=True))
        self.promoted += len(up)
        self.stopped_low += len(rankable) - len(up)
        log.info("multi-fidelity: %d trees on %d/%d windows, %d promoted to the full budget (scale %.3f)",
                 len(trees), self.low_budget, self.full_budget, len(up), scale)
        return out

    def remember(self, mask_fitness: dict[str, float]) -> None:
        self.inner.remember(mask_fitness)

    def close(self) -> None:
        self.inner.close()
