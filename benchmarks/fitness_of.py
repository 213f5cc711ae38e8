"""Fitness of given formulas on a run's own fitness text (full budget), e.g. a metric another run found.

    python benchmarks/fitness_of.py runs/discover-50-s2 "add(add(G, mul(X, sqr(W))), W)" "mul(abs(W), sqrt(X))"
"""
import logging
import sys
from pathlib import Path

from prunerzero.primitives.tree import Tree
from prunerzero.runfolder import run_config
from prunerzero.runs import model_evaluator

logging.basicConfig(level=logging.WARNING)
run = Path(sys.argv[1])
cfg = run_config(run)
ev = model_evaluator(cfg)
trees = [Tree.parse(f) for f in sys.argv[2:]]
for t, r in zip(trees, ev.evaluate(trees)):
    print(f"{r.fitness:.4f}  {t}")
