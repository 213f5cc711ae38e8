"""Cost of one fitness evaluation against its floor (the dense forward pass on the fitness tokens).

For a fixed set of trees (known metrics and random ones) on the model and fitness budget of a
config (default configs/smollm2-135m.yaml), prints per candidate the time spent in score+mask and
in the masked forward pass, the floor measured in the same run, and the overhead ratio, on the full
budget and, when the config sets ``fitness.multi_fidelity``, on the low rung too, with the Spearman
rank correlation of fitness between the two budgets. With ``--modes`` it also prices the reference
"sequential" statistics mode (X re-collected per candidate) and, over the same trees, the Spearman
rank correlation of fitness between the modes. It prints the peak resident memory against the
target (2 x the fp32 model + the statistics).

    python benchmarks/fitness.py --repeats 3
    python benchmarks/fitness.py --trees 20 --repeats 1 --modes   # the 20-tree studies (slow)

The last line reads ``overhead: R`` (median candidate time / median floor, full budget).
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
    low = cfg.fitness.multi_fidelity.low_windows if cfg.fitness.multi_fidelity else None
    fitness = ModelFitness(settings, args.run_dir)
    trees = tree_set(args.trees)
    print(f"model {settings.model}, fitness budget {settings.windows} x {settings.seqlen} tokens"
          f"{f' (low rung {low} x {settings.seqlen})' if low else ''}, sparsity {settings.sparsity} "
          f"{settings.pattern}, {len(trees)} trees, {args.repeats} repeats, {torch.get_num_threads()} threads")

    budgets = [None] + ([low] if low else [])
    floors = {b: [] for b in budgets}
    cands = {b: [] for b in budgets}
    parts = {b: {"score_mask": [], "forward": []} for b in budgets}
    fits: dict = {b: {} for b in budgets}
    for _ in range(args.repeats):
        for tree in trees:
            for b in budgets:  # side by side: the floor right before the candidate it prices
                t0 = time.perf_counter()
                fitness.forward_loss(b)  # the floor: the same forward pass on the dense model
                floors[b].append(time.perf_counter() - t0)
                fitness.known_masks.clear()  # measure real evaluations, not mask-cache hits
                res = fitness.evaluate(tree, b)
                cands[b].append(res.seconds)
                fits[b][str(tree)] = res
                for k, v in (res.timings or {}).items():
                    parts[b][k].append(v)
    for b in budgets:
        name = f"{b or settings.windows} x {settings.seqlen} tokens" + (" (low rung)" if b else " (full budget)")
        floor, cand = statistics.median(floors[b]), statistics.median(cands[b])
        print(f"[{name}] floor (dense forward) median {floor:.3f} s, candidate median {cand:.3f} s, "
              f"overhead {cand / floor:.2f}")
        for k, v in parts[b].items():
            if v:
                print(f"  {k:<12} median {statistics.median(v):.3f} s")
    model_mb = sum(p.numel() * 4 for p in fitness.model.parameters()) / 2**20
    stats_mb = sum(t.numel() * t.element_size() for d in (fitness.activations, fitness.gradients)
                   for t in d.values()) / 2**20
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB; model fp32 {model_mb:.0f} MiB, "
          f"statistics {stats_mb:.0f} MiB, target 2 x model + statistics = {2 * model_mb + stats_mb:.0f} MiB")
    names = [str(t) for t in trees]
    ranked = [n for n in names if fits[None][n].reason is None]
    print(f"{'fitness':>14} " + (f"{'low rung':>14} " if low else "") + " tree")
    for n in names:
        print(f"{fits[None][n].fitness:>14.3f} " + (f"{fits[low][n].fitness:>14.3f} " if low else "") + f" {n}")
    if low:
        rho = spearman([fits[None][n].fitness for n in ranked], [fits[low][n].fitness for n in ranked])
        good = [n for n in ranked if fits[None][n].fitness < 1000]
        rho_good = spearman([fits[None][n].fitness for n in good], [fits[low][n].fitness for n in good])
        print(f"spearman(low rung, full budget) over {len(ranked)} rankable trees: {rho:.3f}; "
              f"over the {len(good)} with full-budget ppl < 1000: {rho_good:.3f}")

    if args.modes:
        seq = ModelFitness(replace(settings, stats_mode="sequential"), args.run_dir, fitness.model, fitness.tokenizer,
                           _source(settings))
        seq_fitness, seq_times = {}, []
        for tree in trees:
            res = seq.evaluate(tree)
            seq_fitness[str(tree)] = res.fitness
            seq_times.append(res.seconds)
            log.info("sequential %.3f (once %.3f) %s", res.fitness, fits[None][str(tree)].fitness, tree)
        cand = statistics.median(cands[None])
        print(f"candidate (sequential mode)      median {statistics.median(seq_times):.3f} s "
              f"({statistics.median(seq_times) / cand:.1f}x the once mode)")
        rho = spearman([fits[None][n].fitness for n in ranked], [seq_fitness[n] for n in ranked])
        good = [n for n in ranked if fits[None][n].fitness < 1000]
        rho_good = spearman([fits[None][n].fitness for n in good], [seq_fitness[n] for n in good])
        print(f"spearman(once, sequential) over {len(ranked)} rankable trees: {rho:.3f}; "
              f"over the {len(good)} with once-mode ppl < 1000: {rho_good:.3f}")
        for n in names:
            print(f"{fits[None][n].fitness:>14.3f} {seq_fitness[n]:>14.3f}  {n}")
    print(f"overhead: {statistics.median(cands[None]) / statistics.median(floors[None]):.2f}")


def _source(settings):
    from prunerzero.pruning.models import resolve_model

    return resolve_model(settings.model)


if __name__ == "__main__":
    main()
