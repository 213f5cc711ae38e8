"""Fitness evaluators: in-process and Ray actor pool, behind one interface."""

from prunerzero.fitness.base import WORST_FITNESS, Evaluator, FitnessResult

__all__ = ["WORST_FITNESS", "Evaluator", "FitnessResult"]
