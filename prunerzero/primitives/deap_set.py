"""The DEAP primitive set, generated from the registry, and conversions Tree <-> DEAP individual.

DEAP's ``creator`` puts classes into module globals, which other processes cannot unpickle; the
fitness and individual classes are defined here instead, and trees cross process boundaries as
formula strings.
"""

from __future__ import annotations

import hashlib
import random
from typing import Sequence

from deap import base, gp

from prunerzero.errors import UserError
from prunerzero.primitives.registry import CONSTANTS, FEATURES, OBS_TERMINALS, OPERATORS, TERMINALS, is_constant
from prunerzero.primitives.tree import Tree


class FitnessMin(base.Fitness):
    """One objective, minimised (perplexity)."""

    weights = (-1.0,)


class Individual(gp.PrimitiveTree):
    """A DEAP tree with a fitness."""

    def __init__(self, content: Sequence) -> None:
        super().__init__(content)
        self.fitness = FitnessMin()


def primitive_set(operators: Sequence[str], terminals: Sequence[str], constants: Sequence[str] = (),
                  constants_as_leaves: bool = True) -> gp.PrimitiveSet:
    """A DEAP primitive set with exactly these operators, terminals and constants (validated).

    ``constants_as_leaves=False``: constants are only ever ``pow`` exponents. DEAP draws leaves
    uniformly among the terminals, so with three statistics and three constants half of all leaves
    would be numbers, and most random trees constant or a rescaling of a simpler one."""
    unknown = [o for o in operators if o not in OPERATORS]
    if unknown:
        raise UserError(f"unknown operator(s) {', '.join(unknown)}; known: {', '.join(sorted(OPERATORS))}")
    bad = [t for t in terminals if t not in TERMINALS and t not in FEATURES]
    if bad:
        raise UserError(f"unknown terminal(s) {', '.join(bad)}; known: {', '.join(TERMINALS)} (statistics), "
                        f"{', '.join(FEATURES)} (allocation features)")
    # D is also the OBS update's statistic (a metric's terminal there): only the other features mix badly
    if set(terminals) & set(TERMINALS) and set(terminals) & (set(FEATURES) - set(OBS_TERMINALS)):
        raise UserError("search.terminals mixes weight statistics (W, G, X) with allocation features "
                        f"({', '.join(FEATURES)}): a metric reads the first, an allocation function the second")
    odd = [c for c in constants if not is_constant(c)]
    if odd:
        raise UserError(f"unknown constant(s) {', '.join(map(str, odd))}; known: {', '.join(CONSTANTS)}")
    if not operators or not terminals:
        raise UserError("the search space needs at least one operator and one terminal")
    if "pow" in operators and not constants:
        raise UserError("operator pow needs constant exponents: list some in search.constants (e.g. [0.25, 0.5, 2])")
    pset = gp.PrimitiveSet("metric", 0)
    for name in operators:
        op = OPERATORS[name]
        pset.addPrimitive(op.torch_fn, op.arity, name=name)
    for name in list(terminals) + (list(constants) if constants_as_leaves else []):
        pset.addTerminal(name, name=name)
    if not constants_as_leaves:  # known by name (trees convert both ways), never drawn as a leaf
        for name in constants:
            pset.mapping[name] = gp.Terminal(name, True, pset.ret)
    pset.exponents = [pset.mapping[c] for c in constants]
    return pset


def repair_pow(ind: gp.PrimitiveTree, pset: gp.PrimitiveSet) -> gp.PrimitiveTree:
    """Give every ``pow`` a constant exponent: a right child that is not a constant leaf is replaced
    by a constant drawn from the set (with ``random``, so the search stays seeded). Crossover and
    mutation are untyped in DEAP and may put any subtree there; repairing keeps the rest of the child."""
    constants = pset.exponents
    i = 0
    while i < len(ind):
        if ind[i].name == "pow":
            right = ind.searchSubtree(i + 1).stop
            span = ind.searchSubtree(right)
            if not is_constant(ind[right].name):
                ind[span] = [random.choice(constants)]
        i += 1
    return ind


def space_fingerprint(operators: Sequence[str], terminals: Sequence[str], constants: Sequence[str] = ()) -> str:
    """Identity of a search space, including each operator's documented semantics."""
    text = "|".join(f"{o}/{OPERATORS[o].arity}/{OPERATORS[o].protection}" for o in sorted(operators))
    text += "|" + ",".join(sorted(terminals))
    if constants:  # spaces without constants keep the fingerprint they always had
        text += "|" + ",".join(sorted(constants))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def to_individual(tree: Tree, pset: gp.PrimitiveSet) -> Individual:
    missing = [n for n in tree.nodes if n not in pset.mapping]
    if missing:
        raise UserError(f"tree {tree} uses {', '.join(sorted(set(missing)))}, outside this search space")
    return Individual([pset.mapping[n] for n in tree.nodes])


def to_tree(ind: gp.PrimitiveTree) -> Tree:
    return Tree(node.name for node in ind)
