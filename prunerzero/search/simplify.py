"""Opposing-operation simplification (OOS) with SymPy, and the canonical form that keys the cache.

A tree goes to SymPy, where automatic evaluation cancels opposing operations wherever they sit
(``exp(log x)``, ``log(exp x)``, ``sqrt(x**2)``, ``(sqrt x)**2``, ``-(-x)``, ``|(|x|)|``, ``x - x``,
...) and sorts commutative arguments; the result comes back as a tree where the operator set can
express it. Because the protected torch operators differ from their SymPy images in corners, every
simplification is checked by a ``same_ranking`` function the evaluator provides (the search knows
no masks): the simplified tree must prune like the original on statistics of realistic scale with
the run's pattern, or it is refused. A simplified tree is used only if it fits the run's bloat limits
(``max_height``, ``max_size``) and its primitive set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Collection

import sympy

from prunerzero.primitives.tree import Tree

SameRanking = Callable[[Tree, Tree], bool]


@dataclass(frozen=True)
class Simplified:
    tree: Tree  # the simplified tree (the original when nothing could be simplified safely)
    key: str  # canonical form: equal keys mean the same metric
    changed: bool
    constant: bool  # the metric is a constant: it cannot rank weights



class Simplifier:
    """OOS for one run: its equivalence check, bloat limits and primitive set; results are cached."""

    def __init__(self, same_ranking: SameRanking | None = None, max_height: int | None = None,
                 max_size: int | None = None, allowed: Collection[str] | None = None):
        self.same_ranking = same_ranking
        self.max_height, self.max_size = max_height, max_size
        self.allowed = set(allowed) if allowed is not None else None
        self._cache: dict[Tree, Simplified] = {}

    def fits(self, tree: Tree) -> bool:
        return ((self.max_height is None or tree.height <= self.max_height)
                and (self.max_size is None or len(tree) <= self.max_size)
                and (self.allowed is None or set(tree.nodes) <= self.allowed))

    def __call__(self, tree: Tree) -> Simplified:
        hit = self._cache.get(tree)
        if hit is None:
            hit = self._cache[tree] = self._simplify(tree)
        return hit

    def _simplify(self, tree: Tree) -> Simplified:
        expr = tree.to_sympy()
        constant = not expr.free_symbols
        key = f"sympy:{sympy.srepr(expr)}"  # = tree.symbolic_key()
        candidate = Tree.from_sympy(expr)
        if candidate == tree:
            return Simplified(tree, key, False, constant)
        if candidate is None or self.same_ranking is None or not self.same_ranking(tree, candidate):
            # Not expressible, or not mask-preserving: keep the tree, keyed by its own text.
            return Simplified(tree, f"tree:{tree}", False, constant)
        if len(candidate) <= len(tree) and self.fits(candidate):
            return Simplified(candidate, key, True, constant)
        return Simplified(tree, key, False, constant)  # the same metric, but its simpler form breaks a limit
