"""Cost of one fitness evaluation against its floor (the dense forward pass on the fitness tokens).

For a fixed set of trees (known metrics and random ones, all with distinct masks) on the model and
fitness budget of a config (default configs/smollm2-135m.yaml), prints per candidate the time spent in score+mask and
in the masked forward pass, the floor measured in the same run, and the overhead ratio, on the full
budget and, when the config sets ``fitness.multi_fidelity``, on the low rung too, with the Spearman
rank correlation of fitness between the two budgets. With ``--modes`` it also prices the reference
"sequential" statistics mode (X re-collected per candidate) and, over the same trees, the Spearman
rank correlation of fitness between the modes. It prints the peak resident memory against the
target (2 x the fp32 model + the statistics).

    python benchmarks/fitness.py --repeats 3
    python benchmarks/fitness.py --trees 20 --repeats 1 --modes --out runs/fitness-study.json  # the 20-tree studies

The last line reads ``overhead: R`` (median candidate time / median floor, full budget).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import resource
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from deap import gp

from prunerzero.config import load_config
from prunerzero.fitness.model_fitness import ModelFitness
from prunerzero.models import resolve_model
from prunerzero.primitives.deap_set import primitive_set, to_tree
from prunerzero.primitives.known import KNOWN_METRICS
from prunerzero.primitives.registry import DEFAULT_OPERATORS
from prunerzero.primitives.tree import Tree
from prunerzero.runfolder import fitness_settings
from prunerzero.search.simplify import Simplifier

log = logging.getLogger("benchmark")


def tree_set(n: int, fitness: ModelFitness, seed: int = 0) -> list[Tree]:
    """The known metrics, then random trees that each prune differently (distinct masks, so no two
    trees are the same point of a rank study). Half the random trees are ``mul(abs(W), t)`` for a
    random ``t``: the region a search spends its time in, where fitnesses are close and ranking
    them right matters most."""
    pset = primitive_set(list(DEFAULT_OPERATORS), ["W", "G", "X"])
    state = random.getstate()
    random.seed(seed)
    trees, masks = [], set()
    candidates = (m.tree for m in KNOWN_METRICS.values() if m.tree.operators <= set(DEFAULT_OPERATORS))
    simplify = Simplifier()
    while len(trees) < n:
        tree = next(candidates, None)
        if tree is None:
            t = to_tree(gp.genHalfAndHalf(pset, 1, 3))
            tree = Tree.parse(f"mul(abs(W), {t})") if random.random() < 0.5 else t
        s = simplify(tree)
        m = None if s.constant else fitness.masks(s.tree)
        if m is None or isinstance(m, str) or m.key() in masks:
            continue
        masks.add(m.key())
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
    ap.add_argument("--out", default=None, help="write per-tree fitnesses here (JSON) and a scatter plot beside it")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    cfg = load_config(args.config)
    settings = fitness_settings(cfg)
    low = cfg.fitness.multi_fidelity.low_windows if cfg.fitness.multi_fidelity else None
    fitness = ModelFitness(settings, args.run_dir)
    trees = tree_set(args.trees, fitness)
    print(f"model {settings.model}, fitness budget {settings.windows} x {settings.seqlen} tokens"
          f"{f' (low rung {low} x {settings.seqlen})' if low else ''}, sparsity {settings.sparsity} "
          f"{settings.pattern}, {len(trees)} trees, {args.repeats} repeats, {torch.get_num_threads()} threads")

    budgets = [None] + ([low] if low else [])
    floors = {b: [] for b in budgets}
    cands = {b: [] for b in budgets}
    parts = {b: {"score_mask": [], "apply_restore": [], "forward": []} for b in budgets}
    fits: dict = {b: {} for b in budgets}
    faults = {b: [] for b in budgets}  # minor page faults per candidate: memory faulted in again
    done, total, began = 0, args.repeats * len(trees), time.perf_counter()
    for _ in range(args.repeats):
        for tree in trees:
            for b in budgets:  # side by side: the floor right before the candidate it prices
                t0 = time.perf_counter()
                fitness.forward_loss(b)  # the floor: the same forward pass on the dense model
                floors[b].append(time.perf_counter() - t0)
                fitness.known_masks.clear()  # measure real evaluations, not mask-cache hits
                faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                res = fitness.evaluate(tree, b)
                faults[b].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before)
                cands[b].append(res.seconds)
                fits[b][str(tree)] = res
                for k, v in (res.timings or {}).items():
                    parts[b][k].append(v)
            done += 1
            log.info("%d/%d candidates (%.1f/min): %s, full budget floor %.2f s, candidate %.2f s", done, total,
                     60 * done / (time.perf_counter() - began), tree, floors[None][-1], cands[None][-1])
    for b in budgets:
        name = f"{b or settings.windows} x {settings.seqlen} tokens" + (" (low rung)" if b else " (full budget)")
        floor, cand = statistics.median(floors[b]), statistics.median(cands[b])
        paired = statistics.median(c / f for c, f in zip(cands[b], floors[b]))
        print(f"[{name}] floor (dense forward) median {floor:.3f} s, candidate median {cand:.3f} s, "
              f"overhead {cand / floor:.3f} (median of the per-candidate ratios to the floor measured "
              f"just before it: {paired:.3f})")
        for k, v in parts[b].items():
            if v:
                print(f"  {k:<12} median {statistics.median(v):.3f} s")
        print(f"  page faults  median {statistics.median(faults[b]):.0f} per candidate")
    model_mb = sum(p.numel() * 4 for p in fitness.model.parameters()) / 2**20
    stats_mb = sum(t.numel() * t.element_size() for d in (fitness.activations, fitness.gradients)
                   for t in d.values()) / 2**20
    peak_mb, target_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 2 * model_mb + stats_mb
    print(f"peak RSS {peak_mb:.0f} MiB; model fp32 {model_mb:.0f} MiB, statistics {stats_mb:.0f} MiB, "
          f"target 2 x model + statistics = {target_mb:.0f} MiB: {'met' if peak_mb <= target_mb else 'NOT met'}")
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
    if args.out:
        study = {"config": args.config, "trees": [
            {"tree": n, "full": fits[None][n].fitness, "rankable": fits[None][n].reason is None,
             **({"low": fits[low][n].fitness} if low else {}),
             **({"sequential": seq_fitness[n]} if args.modes else {})} for n in names]}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(study, indent=1))
        plot_study(study, Path(args.out).with_suffix(".png"))
    print(f"overhead: {statistics.median(cands[None]) / statistics.median(floors[None]):.3f}")


def plot_study(study: dict, path: Path) -> None:
    """Full-budget fitness against the low rung and against the sequential mode, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in study["trees"] if r["rankable"]]
    panels = [(k, label) for k, label in (("low", "low rung (first windows)"), ("sequential", "sequential statistics"))
              if rows and k in rows[0]]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        x, y = [r["full"] for r in rows], [r[key] for r in rows]
        rho = spearman(x, y)
        ax.scatter(x, y, s=18)
        lo, hi = min(x + y), max(x + y)
        ax.plot([lo, hi], [lo, hi], color="grey", linewidth=0.8, linestyle="--")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("fitness: full budget, statistics once (ppl)")
        ax.set_ylabel(f"fitness: {label} (ppl)")
        ax.set_title(f"{len(rows)} trees, Spearman {rho:.3f}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _source(settings):
    return resolve_model(settings.model)


if __name__ == "__main__":
    main()
