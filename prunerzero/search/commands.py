"""``prunerzero search`` and ``prunerzero export``: run, resume and export searches."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import yaml

from prunerzero.errors import UserError
from prunerzero.fitness.base import Evaluator, mask_cache_key
from prunerzero.primitives.deap_set import space_fingerprint
from prunerzero.search import checkpoint as ckpt
from prunerzero.search.config import SearchConfig, config_from_dict, load_config
from prunerzero.search.engine import GeneticSearch, SearchState

log = logging.getLogger(__name__)


def fitness_settings(cfg: SearchConfig, resolve_device: bool = True):
    from prunerzero.cli import pick_device
    from prunerzero.fitness.model_fitness import FitnessSettings
    from prunerzero.pruning.calibration import Calibration

    c, f = cfg.calibration, cfg.fitness
    return FitnessSettings(
        model=cfg.model.name, sparsity=f.sparsity, pattern=f.pattern,
        calibration=Calibration(c.source, c.split, c.nsamples, c.seqlen, c.seed, c.data_dir),
        text=f.text, split=f.split, seqlen=f.seqlen, windows=f.windows, stats_mode=f.stats_mode,
        device=pick_device(cfg.model.device) if resolve_device else cfg.model.device,
    )


def fingerprint(cfg: SearchConfig) -> dict[str, Any]:
    """What a resumed run must share with the original: search space, fitness, algorithm, seed."""
    s = cfg.search
    if cfg.evaluator.type == "reconstruction":
        fit: dict[str, Any] = {"evaluator": "reconstruction", "sparsity": cfg.fitness.sparsity, "pattern": cfg.fitness.pattern}
    else:
        fit = fitness_settings(cfg, resolve_device=False).fingerprint()
        if cfg.fitness.multi_fidelity is not None:  # estimated fitnesses depend on it
            mf = cfg.fitness.multi_fidelity
            fit["multi_fidelity"] = {"low_windows": mf.low_windows, "promote": mf.promote}
    space = {"operators": sorted(s.operators), "terminals": sorted(s.terminals),
             "semantics": space_fingerprint(s.operators, s.terminals, s.constants)}
    if s.constants:  # runs without constants keep the fingerprint they were written with
        space["constants"] = sorted(s.constants, key=float)
    return {"space": space,
            "fitness": fit, "algorithm": s.algorithm, "seed": cfg.seed}


def make_evaluator(cfg: SearchConfig) -> Evaluator:
    evaluator = _model_evaluator(cfg)
    mf = cfg.fitness.multi_fidelity
    if mf is None:
        return evaluator
    from prunerzero.fitness.multi_fidelity import MultiFidelityEvaluator

    return MultiFidelityEvaluator(evaluator, mf.low_windows, mf.promote)


def _model_evaluator(cfg: SearchConfig) -> Evaluator:
    e = cfg.evaluator
    if e.type == "reconstruction":
        from prunerzero.fitness.reconstruction import ReconstructionEvaluator

        return ReconstructionEvaluator(sparsity=cfg.fitness.sparsity, pattern=cfg.fitness.pattern, seed=cfg.seed)
    if e.type == "ray":
        from prunerzero.fitness.ray_pool import RayEvaluator, RaySettings

        return RayEvaluator(fitness_settings(cfg), cfg.run_dir, RaySettings(
            workers=e.workers, cpus_per_worker=e.cpus_per_worker, gpus_per_worker=e.gpus_per_worker,
            threads_per_worker=e.threads_per_worker, address=e.address, timeout_s=e.timeout_s))
    from prunerzero.fitness.model_fitness import InProcessEvaluator

    return InProcessEvaluator(fitness_settings(cfg), cfg.run_dir)


def known_masks(state: SearchState, cfg: SearchConfig) -> dict[str, float]:
    """The mask-level cache a resumed run starts with: every fitness measured so far, per budget."""
    known = {}
    low = cfg.fitness.multi_fidelity.low_windows if cfg.fitness.multi_fidelity else None
    for r in state.cache.values():
        if "mask_key" not in r or "reason" in r:
            continue
        if not r.get("estimated"):
            known[mask_cache_key(r["mask_key"], None)] = r["fitness"]
        if low is not None and "low_fitness" in r:
            known[mask_cache_key(r["mask_key"], low)] = r["low_fitness"]
    return known


def run_search(cfg: SearchConfig, resume: bool = False, force: bool = False, generations: int | None = None,
               evaluator: Evaluator | None = None) -> SearchState:
    """Start or continue the search of ``cfg`` in ``cfg.run_dir``; checkpoint after every generation."""
    run_dir = cfg.run_dir
    fp = fingerprint(cfg)
    state = None
    if resume:
        state, old_fp = ckpt.load_checkpoint(run_dir)
        changes = ckpt.fingerprint_changes(old_fp, fp)
        if changes and not force:
            raise UserError(f"refusing to resume {run_dir}: the search space or fitness changed ({'; '.join(changes)}); "
                            "fitnesses would not compare. Start a new run (another name), or pass --force")
        if changes:
            log.warning("resuming despite changes (--force): %s", "; ".join(changes))
    elif (run_dir / ckpt.STATE).exists():
        raise UserError(f"{run_dir} already holds a search; resume it with --resume {run_dir} or choose another name")
    total = generations if generations is not None else cfg.search.generations
    if state is not None and state.generation >= total:
        log.info("%s already has %d generations; nothing to do (use --generations N to go further)", run_dir, state.generation)
        return state
    ckpt.save_config(run_dir, cfg.to_dict())
    own = evaluator is None
    evaluator = evaluator or make_evaluator(cfg)

    def on_generation(st: SearchState) -> None:
        ckpt.save_checkpoint(run_dir, st, fp, cfg.search.hall_of_fame)
        ckpt.plot_progress(run_dir, st)

    try:
        if state is not None:
            evaluator.remember(known_masks(state, cfg))
        search = GeneticSearch(cfg.search, evaluator, cfg.seed, state, on_generation)
        start = time.perf_counter()
        state = search.run(total)
        log.info("search %s: %d generations, %d metrics evaluated in %.1f s; hall of fame in %s",
                 cfg.name, state.generation, state.counters["evaluated"], time.perf_counter() - start,
                 run_dir / ckpt.HALL_OF_FAME)
        c = state.counters
        log.info("candidates generated %d, simplified %d, regenerated %d, formula-cache hits %d, mask-cache hits %d, "
                 "evaluated %d, degenerate %d", c["generated"], c["simplified"], c["regenerated"],
                 c["formula_cache_hits"], c["mask_cache_hits"], c["evaluated"], c["degenerate"])
        if cfg.fitness.multi_fidelity is not None:
            mf = cfg.fitness.multi_fidelity
            ranked = c["promoted"] + c["stopped_low"]
            spent, full = ranked * mf.low_windows + c["promoted"] * cfg.fitness.windows, ranked * cfg.fitness.windows
            log.info("multi-fidelity: %d promoted to the full budget, %d stopped on the low budget; %d of %d "
                     "fitness windows spent (%.1f%% saved against full-budget evaluation)", c["promoted"],
                     c["stopped_low"], spent, full, 100 * (1 - spent / max(1, full)))
    finally:
        if own:
            evaluator.close()
    return state


def cmd_search(args: argparse.Namespace) -> None:
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / ckpt.CONFIG).is_file():
            raise UserError(f"{run_dir} is not a run folder (no {ckpt.CONFIG}); give the folder printed when the search started")
        cfg = load_config(args.config) if args.config else config_from_dict(yaml.safe_load((run_dir / ckpt.CONFIG).read_text()))
        cfg.output_dir, cfg.name = str(run_dir.parent), run_dir.name
    elif args.config:
        cfg = load_config(args.config)
        if args.name:
            cfg.name = args.name
        if args.output_dir:
            cfg.output_dir = args.output_dir
    else:
        raise UserError("give --config FILE.yaml to start a search, or --resume runs/NAME to continue one")
    if args.dry_run:
        fp = fingerprint(cfg)
        print(json.dumps({"valid": True, "run_dir": str(cfg.run_dir), "fingerprint": fp}, indent=2))
        return
    state = run_search(cfg, resume=bool(args.resume), force=args.force, generations=args.generations)
    for r in ckpt.export_trees(state, 5)["trees"]:
        print(f"{r['rank']:>2}. fitness {r['fitness']:.4f}  size {r['size']:>2}  {r['formula']}")


def cmd_export(args: argparse.Namespace) -> None:
    run_dir = Path(args.run)
    state, _ = ckpt.load_checkpoint(run_dir)
    data = ckpt.export_trees(state, args.top)
    if not data["trees"]:
        raise UserError(f"{run_dir} has no evaluated metric yet")
    out = Path(args.out) if args.out else run_dir / "export.json"
    ckpt.write_atomic(out, json.dumps(data, indent=2) + "\n")
    if args.tree_files:
        for r in data["trees"]:
            ckpt.write_atomic(out.parent / f"{out.stem}-rank{r['rank']}.json", json.dumps(r["tree"], indent=2) + "\n")
    for r in data["trees"]:
        print(f"{r['rank']:>2}. fitness {r['fitness']:.4f}  size {r['size']:>2}  gen {r['generation']:>3}  {r['formula']}")
    print(f"wrote {out} (load a tree with: prunerzero prune --method tree --tree {out})")


def register(sub: Any) -> None:
    p = sub.add_parser("search", help="evolve pruning metrics (start from a YAML config, or resume a run)")
    p.add_argument("--config", default=None, help="YAML config (configs/smollm2-135m.yaml, configs/quick.yaml, ...)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the search in this run folder")
    p.add_argument("--generations", type=int, default=None, help="total generations to reach (default: the config's)")
    p.add_argument("--name", default=None, help="run name (folder under output_dir); default: the config's")
    p.add_argument("--output-dir", default=None)
    p.add_argument("--force", action="store_true", help="resume even if the search space or fitness changed")
    p.add_argument("--dry-run", action="store_true", help="validate the config and exit, loading nothing")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("export", help="write the best trees of a run in the Pruner-Zero JSON format")
    p.add_argument("run", help="run folder (runs/NAME)")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--out", default=None, help="output JSON (default RUN/export.json); loadable by prune --tree")
    p.add_argument("--tree-files", action="store_true", help="also write one bare tree file per rank")
    p.set_defaults(func=cmd_export)
