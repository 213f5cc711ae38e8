"""Opposing-operation simplification (OOS) with SymPy, and the canonical form that keys the cache.

A tree goes to SymPy, where automatic evaluation cancels opposing operations (``exp(log x)``,
``log(exp x)``, ``sqrt(x**2)``, ``(sqrt x)**2``, ``-(-x)``, ``|(|x|)|``, ``x - x``, ...) and sorts
commutative arguments; the result comes back as a tree where the operator set can express it.
Because the protected torch operators differ from their SymPy images in corners (``log`` adds
0.001, ``exp`` clamps), every simplification is then checked numerically: the simplified tree
must induce the same masks as the original on probe statistics, or it is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import sympy
import torch

from prunerzero.primitives.tree import Tree
from prunerzero.pruning.masks import prune_mask


@dataclass(frozen=True)
class Simplified:
    tree: Tree  # the simplified tree (the original when nothing could be simplified safely)
    key: str  # canonical form: equal keys mean the same metric
    changed: bool
    constant: bool  # the metric is a constant: it cannot rank weights


def _probes() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1234)
    out = []
    for rows, cols in ((16, 64), (8, 128)):
        w = torch.randn(rows, cols, generator=gen).abs()
        g = torch.randn(rows, cols, generator=gen).abs() * 0.05 + 1e-4
        x = torch.rand(1, cols, generator=gen) * 4 + 1e-3
        out.append({"W": w, "G": g, "X": x})
    return out


_PROBES = _probes()


def same_masks(a: Tree, b: Tree, sparsities: tuple[float, ...] = (0.3, 0.5, 0.7)) -> bool:
    """Do two trees prune the same weights on the probe statistics (row-wise ranking)?"""
    for stats in _PROBES:
        sa, sb = a.evaluate(stats), b.evaluate(stats)
        for s in sparsities:
            if not torch.equal(prune_mask(sa, s), prune_mask(sb, s)):
                return False
    return True


@lru_cache(maxsize=100_000)
def simplify(tree: Tree) -> Simplified:
    expr = tree.to_sympy()
    constant = not expr.free_symbols or isinstance(expr, sympy.Number)
    candidate = Tree.from_sympy(expr)
    if candidate is not None and candidate != tree and len(candidate) <= len(tree) and same_masks(tree, candidate):
        return Simplified(candidate, f"sympy:{sympy.srepr(expr)}", True, constant)
    if candidate is not None and candidate == tree:
        return Simplified(tree, f"sympy:{sympy.srepr(expr)}", False, constant)
    # Not expressible, or not provably mask-preserving: keep the tree, keyed by its own text.
    return Simplified(tree, f"tree:{tree}", False, constant)
