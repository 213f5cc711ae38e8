"""The DEAP primitive set, generated from the registry, and conversions Tree <-> DEAP individual.

DEAP's ``creator`` puts classes into module globals, which other processes cannot unpickle; the
fitness and individual classes are defined here instead, and trees cross process boundaries as
formula strings.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

from deap import base, gp

from prunerzero.errors import UserError
from prunerzero.primitives.registry import OPERATORS, TERMINALS
from prunerzero.primitives.tree import Tree


class FitnessMin(base.Fitness):
    """One objective, minimised (perplexity)."""

    weights = (-1.0,)


class Individual(gp.PrimitiveTree):
    """A DEAP tree with a fitness."""

    def __init__(self, content: Sequence) -> None:
        super().__init__(content)
        self.fitness = FitnessMin()


def primitive_set(operators: Sequence[str], terminals: Sequence[str]) -> gp.PrimitiveSet:
    """A DEAP primitive set with exactly these operators and terminals (validated)."""
    unknown = [o for o in operators if o not in OPERATORS]
    if unknown:
        raise UserError(f"unknown operator(s) {', '.join(unknown)}; known: {', '.join(sorted(OPERATORS))}")
    bad = [t for t in terminals if t not in TERMINALS]
    if bad:
        raise UserError(f"unknown terminal(s) {', '.join(bad)}; known: {', '.join(TERMINALS)}")
    if not operators or not terminals:
        raise UserError("the search space needs at least one operator and one terminal")
    pset = gp.PrimitiveSet("metric", 0)
    for name in operators:
        op = OPERATORS[name]
        pset.addPrimitive(op.torch_fn, op.arity, name=name)
    for name in terminals:
        pset.addTerminal(name, name=name)
    return pset


def space_fingerprint(operators: Sequence[str], terminals: Sequence[str]) -> str:
    """Identity of a search space, including each operator's documented semantics."""
    text = "|".join(f"{o}/{OPERATORS[o].arity}/{OPERATORS[o].protection}" for o in sorted(operators))
    return hashlib.sha256((text + "|" + ",".join(sorted(terminals))).encode()).hexdigest()[:16]


def to_individual(tree: Tree, pset: gp.PrimitiveSet) -> Individual:
    missing = [n for n in tree.nodes if n not in pset.mapping]
    if missing:
        raise UserError(f"tree {tree} uses {', '.join(sorted(set(missing)))}, outside this search space")
    return Individual([pset.mapping[n] for n in tree.nodes])


def to_tree(ind: gp.PrimitiveTree) -> Tree:
    return Tree(node.name for node in ind)
