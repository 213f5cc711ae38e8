"""The one path from a tree to masks: a layer's statistics -> the tree's scores -> checked -> a mask.

Every caller that turns a metric into masks goes through :func:`tree_mask` (one layer, or one block
of a layer inside the OBS update) or :func:`model_masks` (every prunable layer, side by side on a
CPU): ``prune``, the fitness (in-process, Ray and sequential), the OBS update, the reconstruction
stand-in and the simplifier's equivalence check. The checks a mask needs live here once: scores
that hold NaN or Inf, or cannot tell weights apart within their comparison group, are refused
(pruning them would pick weights by position, not by the metric).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import Executor, wait
from dataclasses import dataclass

import torch
from torch import nn

from prunerzero.errors import UserError
from prunerzero.primitives.registry import finite
from prunerzero.primitives.tree import Tree
from prunerzero.pruning.masks import PackedMask, PackedMasks, Pattern, prune_count, prune_mask

Stats = Mapping[str, torch.Tensor]


class UnrankableLayer(UserError):
    """A metric's scores cannot rank a layer's (or a block's) weights."""


@dataclass(frozen=True)
class MaskRule:
    """How scores become a mask: the fraction to prune, the pattern, and the comparison group
    (``row``: each output row ranks its own weights, every tree; ``tensor``: the whole layer or
    block at once, magnitude and SparseGPT's block). ``counts`` (unstructured only): a layerwise
    allocation's exact number of weights to prune per layer, which replaces ``sparsity``."""

    sparsity: float
    pattern: Pattern = Pattern()
    group: str = "row"
    counts: Mapping[str, int] | None = None

    def count(self, name: str) -> int | None:
        return None if self.counts is None else self.counts[name]


def layer_stats(weight: torch.Tensor | None, x: torch.Tensor | None, g: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The statistics a tree reads for one layer; those given as None are left out (|W| costs a
    pass over the weights, so a caller that knows its tree needs no W passes none)."""
    stats = {} if weight is None else {"W": weight.detach().abs().float()}
    if x is not None:
        stats["X"] = finite(x.reshape(1, -1).float())  # tiny; G is made finite where it is computed
    if g is not None:
        stats["G"] = g.float()
    return stats


def unrankable(scores: torch.Tensor, group: str = "row") -> str | None:
    """Why a 2-D score tensor cannot rank weights, else None: NaN/Inf, or (``row``) constant in
    every row, (``tensor``) one value for every weight.

    Row maxima and minima answer both questions in one cheap pass (amax/amin propagate NaN and
    show an Inf), where a full isfinite() would cost five times as much on CPU."""
    if group == "tensor":
        high, low = scores.amax(), scores.amin()
    else:
        high, low = scores.amax(dim=1), scores.amin(dim=1)
    if not bool(torch.isfinite(high).all() and torch.isfinite(low).all()):
        return "scores contain NaN or Inf"
    if bool((high == low).all()):
        return "scores are constant in every row" if group != "tensor" else "scores are one value for every weight"
    return None


def tree_mask(tree: Tree, stats: Stats, shape: torch.Size | tuple[int, ...], rule: MaskRule,
              name: str = "the layer", count: int | None = None) -> torch.Tensor:
    """A layer's (or block's) mask, True = prune: the tree's scores on ``stats``, checked, then the
    lowest ``rule.sparsity`` of each comparison group (or exactly ``count`` of them). A tree that
    cannot rank the weights raises :class:`UnrankableLayer` naming ``name``."""
    scores = tree.evaluate(stats, shape)
    why = unrankable(scores, rule.group)
    if why is not None:
        raise UnrankableLayer(f"the metric cannot rank the weights of {name}: {why}; a metric must vary within "
                              "each comparison group (a tree that simplifies to a constant prunes by position)")
    if count is not None:
        return prune_count(scores, count, rule.group)
    return prune_mask(scores, rule.sparsity, rule.pattern, group=rule.group)


def model_masks(tree: Tree, layers: Mapping[str, nn.Linear], stats_of: Callable[[str, nn.Linear], Stats],
                rule: MaskRule, pool: Executor | None = None) -> PackedMasks:
    """Every layer's mask, packed as bits (a bool copy of every weight is what a fitness worker can
    least afford). ``stats_of(name, layer)`` gives a layer's statistics. With a ``pool`` the layers
    are scored and selected side by side, each in a thread that sets its own torch thread count
    (see :func:`one_thread`); the first unrankable layer stops the rest."""

    def one(name: str, lin: nn.Linear) -> PackedMask:
        return PackedMask.of(tree_mask(tree, stats_of(name, lin), lin.weight.shape, rule, name, rule.count(name)))

    masks = PackedMasks()
    if pool is None:
        for name, lin in layers.items():
            masks.add(name, one(name, lin))
        return masks
    futures = {name: pool.submit(one_thread, one, name, lin) for name, lin in layers.items()}
    try:
        for name, future in futures.items():
            masks.add(name, future.result())
    finally:
        for future in futures.values():
            future.cancel()
        wait(futures.values())
    return masks


def one_thread(fn: Callable, *args: object) -> object:
    # torch's thread count is per thread: a pool thread takes the process-wide count when it first
    # runs an op, so it is set here, in the thread itself.
    torch.set_num_threads(1)
    return fn(*args)
