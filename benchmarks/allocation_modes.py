"""Does the allocation search's fitness rank allocations as the reference pruning procedure does?

For Wanda at a run's sparsity, the fitness (the run's fitness text and statistics) of the uniform
allocation, OWL (the function B) and the run's best allocation function, with the statistics taken
once from the dense model (``stats_mode: once``, what the search used) and re-collected block by
block on the partly pruned model (``sequential``, the reference procedure, about 6x the cost).
Writes ``--out`` (JSON) and prints the six fitnesses.

    python benchmarks/allocation_modes.py runs/allocation-70 --out results/allocations/modes-70.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

from prunerzero.files import write_json
from prunerzero.fitness.allocation_fitness import AllocationEvaluator
from prunerzero.fitness.model_fitness import ModelFitness
from prunerzero.primitives.known import resolve_tree
from prunerzero.primitives.tree import Tree
from prunerzero.pruning.allocation import exact_counts
from prunerzero.runfolder import fitness_settings, run_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="an allocation search's run folder")
    p.add_argument("--out", default=None, help="JSON record to write")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    run = Path(args.run)
    cfg = run_config(run)
    a = cfg.fitness.allocation
    metric = resolve_tree(cfg.search.metric)
    best = json.loads((run / "allocation.json").read_text())["function"]
    out: dict = {"run": run.name, "metric": str(metric), "target": cfg.fitness.sparsity, "best_function": best,
                 "fitness": {}}
    for mode in ("once", "sequential"):
        fit = ModelFitness(dataclasses.replace(fitness_settings(cfg), stats_mode=mode), run)
        ev = AllocationEvaluator(fit, metric, a.lam, a.m, a.range)
        target = cfg.fitness.sparsity
        allocations = {"uniform": exact_counts(dict.fromkeys(ev.sizes, target), ev.sizes, target, a.range[0],
                                               a.range[1], "uniform"),
                       "owl": ev.allocation(Tree.parse("B")), "searched": ev.allocation(Tree.parse(best))}
        for name, allocation in allocations.items():
            start = time.perf_counter()
            fit.allocation = allocation
            out["fitness"][f"{mode}/{name}"] = fit.evaluate(metric).fitness
            fit.allocation = None
            print(f"{mode:10s} {name:9s} {out['fitness'][f'{mode}/{name}']:.3f}  ({time.perf_counter() - start:.0f} s)")
    if args.out:
        write_json(args.out, out)


if __name__ == "__main__":
    main()
