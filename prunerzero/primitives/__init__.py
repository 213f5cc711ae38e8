"""The operator registry and expression trees (JSON, formula, SymPy, torch, DEAP)."""

from prunerzero.primitives.registry import OPERATORS, TERMINALS, Operator
from prunerzero.primitives.tree import Tree

__all__ = ["OPERATORS", "TERMINALS", "Operator", "Tree"]
