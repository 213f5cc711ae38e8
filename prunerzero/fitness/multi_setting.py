"""Several settings scored at once (``fitness.settings``): a metric that wins at 50% must not collapse
at 70% or at 2:4, as the published Pruner-Zero metric does.

Each setting (sparsity, pattern, allocation) is a :class:`ModelFitness` of its own, all sharing one
model, its statistics (the same calibration: one file each) and the fitness text. A tree's fitness is
the geometric mean over the settings of its perplexity divided by the reference metric's (Wanda by
default, measured once per setting and budget, with the run's weight update): 1.0 is the reference
everywhere, 0.98 is 2% better on average in log perplexity. A tree that cannot prune one setting
gets the worst fitness, naming the setting. Masks are cached per setting inside each fitness; the
mask key of a tree is the hash of its keys in every setting.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from prunerzero.errors import UserError
from prunerzero.fitness.base import Evaluator, FitnessResult, with_progress
from prunerzero.fitness.model_fitness import FitnessSettings, ModelFitness
from prunerzero.models import load_model
from prunerzero.primitives.tree import Tree
from prunerzero.pruning.equivalence import same_masks
from prunerzero.pruning.masks import Pattern


def setting_label(s: FitnessSettings) -> str:
    alloc = f", {s.allocation}" if s.allocation else ""
    return f"{s.sparsity:g} {s.pattern}{alloc}"


class MultiSettingEvaluator(Evaluator):
    """Evaluates trees in every setting, in this process; fitness = geometric mean of ratios."""

    def __init__(self, settings: Sequence[FitnessSettings], run_dir: str | Path, reference: Tree,
                 gradients: bool = True, model: Any = None, tokenizer: Any = None, source: Any = None):
        if not settings:
            raise UserError("fitness.settings is empty: list at least one {sparsity, pattern} (or remove the key)")
        if model is None:
            model, tokenizer, source = load_model(settings[0].model, settings[0].device)
        self.fitnesses = [ModelFitness(s, run_dir, model, tokenizer, source, gradients=gradients) for s in settings]
        self.settings = list(settings)
        self.reference = reference
        self.full_budget = settings[0].windows
        self.pattern = settings[0].pattern
        self.mask_group = settings[0].mask_group
        self._reference_ppl: dict[tuple[int, int | None], float] = {}

    def reference_perplexity(self, index: int, budget: int | None) -> float:
        """The reference metric's perplexity in one setting (measured once per budget)."""
        key = (index, budget)
        if key not in self._reference_ppl:
            res = self.fitnesses[index].evaluate(self.reference, budget)
            if res.reason is not None:
                raise UserError(f"the reference metric {self.reference} cannot prune setting "
                                f"{setting_label(self.settings[index])}: {res.reason}")
            self._reference_ppl[key] = res.fitness
        return self._reference_ppl[key]

    def per_setting(self, tree: Tree, budget: int | None = None) -> list[FitnessResult]:
        """The tree's result in each setting (perplexities, not ratios)."""
        return [fit.evaluate(tree, budget) for fit in self.fitnesses]

    def evaluate(self, trees: Sequence[Tree], budget: int | None = None) -> list[FitnessResult]:
        out = []
        for tree in with_progress(trees):
            results = self.per_setting(tree, budget)
            bad = next((i for i, r in enumerate(results) if r.reason is not None), None)
            seconds = sum(r.seconds for r in results)
            if bad is not None:
                out.append(FitnessResult.worst(f"setting {setting_label(self.settings[bad])}: {results[bad].reason}",
                                               seconds))
                continue
            logs = [math.log(r.fitness / self.reference_perplexity(i, budget)) for i, r in enumerate(results)]
            key = hashlib.blake2b("".join(r.mask_key or "" for r in results).encode(), digest_size=16).hexdigest()
            cached = "mask" if all(r.cached == "mask" for r in results) else None
            out.append(FitnessResult.measured(math.exp(sum(logs) / len(logs)), mask_key=key, seconds=seconds,
                                              cached=cached, budget=budget))
        return out

    def probe_statistics(self) -> list[dict[str, torch.Tensor]]:
        return self.fitnesses[0].probe_statistics()

    def same_ranking(self, a: Tree, b: Tree) -> bool:
        """Alike in every setting's pattern (a rewrite must prune alike at 50% and at 2:4)."""
        if self._probes is None:
            self._probes = self.probe_statistics()
        patterns = {s.pattern for s in self.settings}
        return all(same_masks(a, b, self._probes, Pattern.parse(p), group=self.mask_group) for p in sorted(patterns))

    def remember(self, mask_fitness: Mapping[str, float]) -> None:
        """Resume: the combined keys are not any setting's, so each setting measures again once."""


def settings_for(base: FitnessSettings, entries: Sequence[Mapping[str, Any]]) -> list[FitnessSettings]:
    """One FitnessSettings per ``fitness.settings`` entry: the base with its sparsity, pattern and
    allocation replaced (an entry's N:M pattern sets its sparsity to N/M)."""
    out = []
    for entry in entries:
        pattern = Pattern.parse(str(entry.get("pattern", "unstructured")))
        sparsity = entry.get("sparsity", pattern.n / pattern.m if pattern.structured else base.sparsity)
        out.append(dataclasses.replace(base, sparsity=sparsity, pattern=str(pattern),
                                       allocation=entry.get("allocation")))
    return out
