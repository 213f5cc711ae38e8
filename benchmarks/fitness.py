"""Cost of one fitness evaluation against its floor (the dense forward pass on the fitness tokens).

For a fixed set of trees (known metrics and random ones) on the model and fitness budget of a
config (default configs/smollm2-135m.yaml), prints per candidate the time spent in score+mask and
in the masked forward pass, the floor measured in the same run, and the overhead ratio. With
``--modes`` it also prices the reference "sequential" statistics mode (X re-collected per
candidate) and, over the same trees, the Spearman rank correlation of fitness between the modes.

    python benchmarks/fitness.py --repeats 3
    python benchmarks/fitness.py --modes --trees 20      # also the sequential mode study (slow)

The last line reads ``overhead: R`` (median candidate time / median floor).
"""

from __future__ import annotations

import argparse
import logging
import random
import resource
import statistics
import time
from dataclasses import replace

import torch
from deap import gp

from prunerzero.fitness.model_fitness import ModelFitness
from prunerzero.primitives.deap_set import primitive_set, to_tree
from prunerzero.primitives.registry import DEFAULT_OPERATORS
from prunerzero.primitives.tree import Tree
from prunerzero.search.commands import fitness_settings
from prunerzero.search.config import load_config
from prunerzero.search.engine import KNOWN_METRICS
from prunerzero.search.simplify import simplify

log = logging.getLogger("benchmark")


def tree_set(n: int, seed: int = 0) -> list[Tree]:
    trees = [Tree.parse(f) for f in KNOWN_METRICS.values()]
    pset = primitive_set(list(DEFAULT_OPERATORS), ["W", "G", "X"])
    state = random.getstate()
    random.seed(seed)
    keys = {simplify(t).key for t in trees}
    while len(trees) < n:
        t = to_tree(gp.genHalfAndHalf(pset, 1, 3))
        s = simplify(t)
        if s.key not in keys and not s.constant:
            keys.add(s.key)
            trees.append(s.tree)
    random.setstate(state)
    return trees


def spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/smollm2-135m.yaml")
    ap.add_argument("--run-dir", default="runs/benchmark-fitness", help="where statistics are cached")
    ap.add_argument("--trees", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", action="store_true", help="also the sequential statistics mode and the Spearman study")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    cfg = load_config(args.config)
    settings = fitness_settings(cfg)
    fitness = ModelFitness(settings, args.run_dir)
    trees = tree_set(args.trees)
    print(f"model {settings.model}, fitness budget {settings.windows} x {settings.seqlen} tokens, "
          f"sparsity {settings.sparsity} {settings.pattern}, {len(trees)} trees, {args.repeats} repeats, "
          f"{torch.get_num_threads()} threads")

    floors, cands, parts = [], [], {"score_mask": [], "forward": []}
    once_fitness = {}
    for _ in range(args.repeats):
        for tree in trees:
            t0 = time.perf_counter()
            fitness.forward_loss()  # the floor: the same forward pass on the dense model
            floors.append(time.perf_counter() - t0)
            fitness.known_masks.clear()  # measure real evaluations, not mask-cache hits
            res = fitness.evaluate(tree)
            cands.append(res.seconds)
            once_fitness[str(tree)] = res.fitness
            for k, v in (res.timings or {}).items():
                parts[k].append(v)
    floor, cand = statistics.median(floors), statistics.median(cands)
    print(f"floor (dense forward)            median {floor:.3f} s")
    print(f"candidate (once mode)            median {cand:.3f} s")
    for k, v in parts.items():
        if v:
            print(f"  {k:<30} median {statistics.median(v):.3f} s")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    for tree in trees:
        print(f"  {once_fitness[str(tree)]:>12.3f}  {tree}")

    if args.modes:
        seq = ModelFitness(replace(settings, stats_mode="sequential"), args.run_dir, fitness.model, fitness.tokenizer,
                           _source(settings))
        seq_fitness, seq_times = {}, []
        for tree in trees:
            res = seq.evaluate(tree)
            seq_fitness[str(tree)] = res.fitness
            seq_times.append(res.seconds)
        print(f"candidate (sequential mode)      median {statistics.median(seq_times):.3f} s "
              f"({statistics.median(seq_times) / cand:.1f}x the once mode)")
        names = [str(t) for t in trees]
        rho = spearman([once_fitness[n] for n in names], [seq_fitness[n] for n in names])
        print(f"spearman(once, sequential) over {len(names)} trees: {rho:.3f}")
    print(f"overhead: {cand / floor:.2f}")


def _source(settings):
    from prunerzero.pruning.models import resolve_model

    return resolve_model(settings.model)


if __name__ == "__main__":
    main()
