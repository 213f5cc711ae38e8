"""A cheap, honest fitness for tests and demos: output reconstruction error of one random linear layer.

A linear layer ``W`` (out, in) sees inputs whose features have very different scales (as in LLMs,
where a few input channels carry outliers). A metric prunes ``W``; the fitness is the relative
error of the layer's outputs, ``||X W^T - X (W*M)^T||^2 / ||X W^T||^2``. Metrics that use the
activations (``X``) beat magnitude here, as Wanda beats magnitude on real models. It runs in
milliseconds, so the search loop can be tested for determinism, resume and caching in seconds.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from prunerzero.fitness.base import Evaluator, FitnessResult
from prunerzero.fitness.model_fitness import mask_key
from prunerzero.primitives.tree import Tree
from prunerzero.pruning.layer_masks import MaskRule, UnrankableLayer, tree_mask
from prunerzero.pruning.masks import Pattern

UNIT_TOKENS = 32  # the fitness unit of this evaluator: a block of input rows (a model's is a window)


class ReconstructionEvaluator(Evaluator):
    def __init__(self, rows: int = 32, cols: int = 64, tokens: int = 256, sparsity: float = 0.5,
                 pattern: str = "unstructured", seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(rows, cols, generator=gen)
        scales = torch.exp(torch.randn(cols, generator=gen) * 1.5)  # heavy-tailed feature scales
        self.inputs = torch.randn(tokens, cols, generator=gen) * scales
        target = self.inputs @ self.weight.t()
        # A stand-in for G: the gradient of a random regression loss at the dense weights.
        self.grad = ((torch.randn(tokens, rows, generator=gen) * target.std(0)).t() @ self.inputs).abs() / tokens
        self.stats = {"W": self.weight.abs(), "G": self.grad, "X": (self.inputs**2).sum(0, keepdim=True)}
        self.target = target
        self.sparsity = sparsity
        self.pattern = str(Pattern.parse(pattern))
        self.full_budget = tokens // UNIT_TOKENS  # a budget counts blocks of UNIT_TOKENS input rows
        self.calls = 0  # number of trees actually evaluated (tests count cache hits with it)

    def fingerprint(self) -> dict[str, Any]:
        return {"evaluator": "reconstruction", "shape": list(self.weight.shape), "sparsity": self.sparsity,
                "pattern": str(self.pattern)}

    def evaluate(self, trees: Sequence[Tree], budget: int | None = None) -> list[FitnessResult]:
        if budget is not None and not 0 < budget <= self.full_budget:
            raise ValueError(f"budget {budget} is outside 1..{self.full_budget}")
        rows = len(self.inputs) if budget in (None, self.full_budget) else budget * UNIT_TOKENS
        budget = None if budget == self.full_budget else budget
        inputs, target = self.inputs[:rows], self.target[:rows]
        out = []
        rule = MaskRule(self.sparsity, Pattern.parse(self.pattern))
        for tree in trees:
            self.calls += 1
            try:
                mask = tree_mask(tree, self.stats, self.weight.shape, rule)
            except UnrankableLayer as e:
                out.append(FitnessResult.worst(str(e)))
                continue
            pruned = self.weight.masked_fill(mask, 0.0)
            err = ((inputs @ pruned.t() - target) ** 2).sum() / (target**2).sum()
            out.append(FitnessResult.measured(float(err), mask_key=mask_key({"w": mask}), budget=budget))
        return out
