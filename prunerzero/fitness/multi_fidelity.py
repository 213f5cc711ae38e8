"""Multi-fidelity fitness: every candidate on a small budget, only the promising on the full one.

One rung of successive halving per batch. All new trees of a batch are measured on the first
``low_budget`` fitness units (token windows). Trees whose masks were measured on the full budget
before take that fitness; of the other distinct mask sets that could be ranked, the best
``promote`` fraction are measured again on the full budget. The others keep an *estimated*
fitness: their low-budget value times the largest full/low ratio seen among the promoted trees of
the batch. That estimate keeps the order of the low rung among them and never ranks an unpromoted
tree above a promoted one of the same batch, which is all that selection needs. Estimated
fitnesses are marked (``estimated``) and never enter the hall of fame, so every exported metric
was measured on the full budget.

The low budget is a prefix of the full one, so the two measurements share their first windows.
``benchmarks/fitness.py`` reports how well the two budgets agree (Spearman) when the config sets
``fitness.multi_fidelity``.
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

from prunerzero.errors import UserError
from prunerzero.fitness.base import (
    WORST_FITNESS,
    Evaluator,
    FitnessResult,
    is_full_budget_key,
)
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
        self.pattern = inner.pattern
        self.full_budget = full
        self.full_known: dict[str, float] = {}  # mask key -> fitness measured on the full budget
        self.promoted = 0  # mask sets measured on both budgets
        self.stopped_low = 0  # mask sets measured on the low budget only (full evaluations saved)

    def evaluate(self, trees: Sequence[Tree], budget: int | None = None) -> list[FitnessResult]:
        if budget is not None:  # a caller that asks for one budget gets exactly that
            return self.inner.evaluate(trees, budget)
        low = self.inner.evaluate(trees, self.low_budget)
        # Masks measured on the full budget before need no promotion; the others compete for the
        # promotion slots as distinct mask sets, best low-budget fitness first.
        full: dict[str, FitnessResult] = {}
        contenders: dict[str, int] = {}
        for i in sorted((i for i, r in enumerate(low) if r.reason is None), key=lambda i: low[i].fitness):
            key = low[i].mask_key
            if key in self.full_known:
                full[key] = FitnessResult(self.full_known[key], mask_key=key, cached="mask")
            else:
                contenders.setdefault(key, i)
        n_up = min(len(contenders), math.ceil(self.promote * len(contenders)))
        up = list(contenders.values())[:n_up]
        for i, res in zip(up, self.inner.evaluate([trees[i] for i in up]) if up else []):
            full[low[i].mask_key] = res
            if res.reason is None:
                self.full_known[low[i].mask_key] = res.fitness

        ratios = [full[r.mask_key].fitness / r.fitness for r in low
                  if r.reason is None and r.mask_key in full and full[r.mask_key].reason is None and r.fitness > 0]
        scale = max((q for q in ratios if math.isfinite(q)), default=1.0)
        out, first = [], set()
        for i, r in enumerate(low):
            f = full.get(r.mask_key) if r.reason is None else None
            if f is not None:  # measured on the full budget (now, or earlier for the same masks)
                cached = f.cached if i in up and r.mask_key not in first else "mask"
                first.add(r.mask_key)
                out.append(FitnessResult(f.fitness, reason=f.reason, mask_key=r.mask_key, seconds=r.seconds + f.seconds,
                                         cached=cached, timings=f.timings, low_fitness=r.fitness))
            elif r.reason is not None:
                out.append(r)
            else:
                out.append(FitnessResult(min(r.fitness * scale, WORST_FITNESS), mask_key=r.mask_key,
                                         seconds=r.seconds, cached=r.cached, budget=self.low_budget,
                                         low_fitness=r.fitness, estimated=True))
        self.promoted += len(up)
        self.stopped_low += len(contenders) - len(up)
        log.info("multi-fidelity: %d trees on %d/%d windows, %d of %d new mask sets promoted to the full budget "
                 "(scale %.3f)", len(trees), self.low_budget, self.full_budget, len(up), len(contenders), scale)
        return out

    def same_ranking(self, a: Tree, b: Tree) -> bool:
        return self.inner.same_ranking(a, b)

    def remember(self, mask_fitness: dict[str, float]) -> None:
        self.full_known.update({k: v for k, v in mask_fitness.items() if is_full_budget_key(k)})
        self.inner.remember(mask_fitness)

    def close(self) -> None:
        self.inner.close()
