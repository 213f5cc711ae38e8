"""Fitness of an *allocation function*: a tree over per-layer features that sets each layer's sparsity.

The same engine that evolves metrics evolves these (``search.space: allocation``): the registry's
operators, OOS, the caches, checkpoints, resume and export all apply; only the leaves differ. The
leaves are the features of :data:`~prunerzero.primitives.registry.FEATURES`, each a vector with one
entry per prunable layer, computed once from the dense model's scores under the run's fixed metric
(``search.metric``, e.g. wanda). With ``fitness.update: obs`` the metric is a rule inside SparseGPT's
weight update (``sparsegpt`` itself, or a shipped obs rule), and each candidate allocation is scored
by the reconstructed model: the allocation searched for the update, not for masks alone.

From the function's values v (one per layer) to sparsities, the mapping is OWL's: v is min-max
scaled to [0, 2 lambda], centred, and subtracted from the target, so a layer with a larger value
keeps more weights; then :func:`~prunerzero.pruning.allocation.exact_counts` makes the global count
exact within the configured range. The tree ``B`` (the block's outlier ratio) is thus OWL itself,
and a constant function is the uniform allocation. The fitness is the perplexity of the model pruned
with the fixed metric at those per-layer counts (:class:`ModelFitness`, the same fitness text).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from prunerzero.errors import UserError
from prunerzero.files import write_json
from prunerzero.fitness.base import Evaluator, FitnessResult, with_progress
from prunerzero.fitness.model_fitness import ModelFitness
from prunerzero.models import decoder_layers, linear_layers
from prunerzero.primitives.registry import FEATURES
from prunerzero.primitives.tree import Tree
from prunerzero.pruning.allocation import OWL_LAMBDA, OWL_M, Allocation, exact_counts, outlier_ratio, owl_ratios
from prunerzero.pruning.layer_masks import layer_stats
from prunerzero.pruning.obs import d_of


def _entropy(scores: torch.Tensor) -> float:
    p = scores.flatten().double()
    total = float(p.sum())
    if total <= 0 or p.numel() < 2:
        return 0.0
    p = p[p > 0] / total
    return float(-(p * p.log()).sum()) / math.log(scores.numel())


def layer_features(model: torch.nn.Module, score_fn: Callable[[str, torch.nn.Module], torch.Tensor],
                   m: float = OWL_M) -> dict[str, torch.Tensor]:
    """The features of every prunable layer (in model order), as float64 vectors.

    ``score_fn(name, linear)`` gives a layer's scores under the fixed metric; they are computed a
    block at a time (the block's outlier ratio needs all of its layers), never for the whole model."""
    names = {id(mod): n for n, mod in model.named_modules()}
    blocks = list(decoder_layers(model))
    rows: dict[str, list[float]] = {k: [] for k in FEATURES}
    for b, block in enumerate(blocks):
        layer_rows = []
        for lin in linear_layers(block).values():
            name = names[id(lin)]
            s = score_fn(name, lin).detach().abs().double()
            layer_rows.append({"D": b / max(1, len(blocks) - 1), "T": float("attn" in name or "attention" in name),
                               "O": outlier_ratio([s], m), "M": float(s.mean()), "S": float(s.std()),
                               "E": _entropy(s), "_flat": s.flatten()})
        block_outliers = outlier_ratio([r.pop("_flat") for r in layer_rows], m)
        for r in layer_rows:
            r["B"] = block_outliers
            for k in FEATURES:
                rows[k].append(r[k])
    out = {k: torch.tensor(v, dtype=torch.float64) for k, v in rows.items()}
    bad = [k for k, v in out.items() if not torch.isfinite(v).all()]
    if bad:
        raise UserError(f"allocation feature(s) {', '.join(bad)} are not finite numbers (NaN or Inf) for this model and "
                        "metric; the metric's scores overflow: choose another search.metric")
    return out


def allocation_of(tree: Tree, features: Mapping[str, torch.Tensor], sizes: Mapping[str, int], target: float,
                  lam: float = OWL_LAMBDA, low: float = 0.0, high: float = 0.99) -> Allocation:
    """The exact per-layer counts an allocation function gives (UserError on non-finite values)."""
    n = len(sizes)
    values = tree.evaluate(features, (n,))
    if not torch.isfinite(values).all():
        raise UserError(f"allocation function {tree} gives NaN or Inf for some layer")
    ratios = owl_ratios(values.tolist(), target, lam)
    return exact_counts(dict(zip(sizes, ratios)), sizes, target, low, high, f"searched:{tree}")


class AllocationEvaluator(Evaluator):
    """Evaluates allocation functions in-process, the metric fixed (see the module docstring)."""

    def __init__(self, fitness: ModelFitness, metric: Tree, lam: float = OWL_LAMBDA, m: float = OWL_M,
                 sparsity_range: Sequence[float] = (0.0, 0.99)):
        self.fitness = fitness
        self.metric = metric
        self.target = fitness.settings.sparsity
        self.lam, self.low, self.high = lam, float(sparsity_range[0]), float(sparsity_range[1])
        self.full_budget = fitness.settings.windows
        self.pattern = "unstructured"
        self.sizes = {n: lin.weight.numel() for n, lin in fitness.linears.items()}
        uses = metric.terminals

        def score(name: str, lin: torch.nn.Module) -> torch.Tensor:
            stats = layer_stats(lin.weight if "W" in uses else None,
                                fitness.activations.get(name) if "X" in uses else None,
                                fitness.gradients.get(name) if "G" in uses else None)
            if "D" in uses:  # a rule inside the update: D of the dense model, from the run's stored factors
                stats["D"] = d_of(torch.diagonal(fitness.obs_factors[name]))
            return metric.evaluate(stats, lin.weight.shape)

        self.features = layer_features(fitness.model, score_fn=score, m=m)
        self._allocations: dict[str, Allocation | str] = {}
        self._reference: dict[str, float] | None = None

    def allocation(self, tree: Tree) -> Allocation | str:
        """The tree's allocation, or why it has none."""
        key = str(tree)
        if key not in self._allocations:
            try:
                self._allocations[key] = allocation_of(tree, self.features, self.sizes, self.target, self.lam,
                                                       self.low, self.high)
            except UserError as e:
                self._allocations[key] = str(e)
        return self._allocations[key]

    def same_ranking(self, a: Tree, b: Tree) -> bool:
        """Two functions are one when they give the same counts on this model's own features."""
        x, y = self.allocation(a), self.allocation(b)
        return x == y if isinstance(x, str) or isinstance(y, str) else x.counts == y.counts

    def remember(self, mask_fitness: dict[str, float]) -> None:
        self.fitness.known_masks.update(mask_fitness)

    def evaluate(self, trees: Sequence[Tree], budget: int | None = None) -> list[FitnessResult]:
        out = []
        for tree in with_progress(trees):
            alloc = self.allocation(tree)
            if isinstance(alloc, str):
                out.append(FitnessResult.worst(alloc))
                continue
            out.append(self._evaluate_counts(alloc, budget))
        return out

    def _evaluate_counts(self, allocation: Allocation, budget: int | None = None) -> FitnessResult:
        """The fixed metric's fitness with these per-layer counts."""
        self.fitness.allocation = allocation
        try:
            return self.fitness.evaluate(self.metric, budget)
        finally:
            self.fitness.allocation = None

    def reference_fitness(self) -> dict[str, float]:
        """Fitness of the uniform allocation and of OWL (the function ``B``) on the same text."""
        if self._reference is None:
            uniform = exact_counts(dict.fromkeys(self.sizes, self.target), self.sizes, self.target, self.low,
                                   self.high, "uniform")
            self._reference = {"uniform": self._evaluate_counts(uniform).fitness,
                               "owl": self.evaluate([Tree.parse("B")])[0].fitness}
        return self._reference

    def write(self, tree: Tree, path: str | Path, fitness: float | None = None, **extra: object) -> dict:
        """The tree's allocation as a ``prunerzero-allocation`` file (``prune --allocation FILE``)."""
        alloc = self.allocation(tree)
        if isinstance(alloc, str):
            raise UserError(f"allocation function {tree} has no allocation: {alloc}")
        data = {**alloc.to_json(self.target), "function": str(tree), "metric": str(self.metric),
                "update": self.fitness.settings.update, "lambda": self.lam, "range": [self.low, self.high],
                "fitness": fitness, **extra}
        write_json(path, data)
        return data
