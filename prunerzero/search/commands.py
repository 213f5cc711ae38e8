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
from prunerzero.evaluation.heldout import Cell, CellRunner, cells_for, format_table, known_cell, summary
from prunerzero.files import write_json
from prunerzero.pruning.models import pick_device
from prunerzero.fitness.base import Evaluator, mask_cache_key
from prunerzero.primitives.deap_set import space_fingerprint
from prunerzero.search import checkpoint as ckpt
from prunerzero.search.config import (HeldoutSection, SearchConfig, config_from_dict, load_config, load_yaml,
                                      validate)
from prunerzero.search.engine import GeneticSearch, SearchState

log = logging.getLogger(__name__)


def _run_config(run_dir: Path) -> SearchConfig:
    if not (run_dir / ckpt.CONFIG).is_file():
        raise UserError(f"{run_dir} is not a run folder (no {ckpt.CONFIG}); give the folder printed when the search started")
    cfg = config_from_dict(_load_yaml(run_dir / ckpt.CONFIG))
    cfg.output_dir, cfg.name = str(run_dir.parent), run_dir.name
    return cfg


def _load_yaml(path: Path) -> Any:
    return load_yaml(path, "run config")


def fitness_settings(cfg: SearchConfig, resolve_device: bool = True):
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
        space["constants_as_leaves"] = s.constants_as_leaves
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
    with ckpt.run_lock(run_dir):
        return _run_search_locked(cfg, resume, force, generations, evaluator)


# Config keys a resumed run may change without --force: how long it runs, where and how fast it
# evaluates, and what is measured after it. Everything else changes what the search does.
FREE_ON_RESUME = ("search.generations", "heldout", "evaluator.workers", "evaluator.cpus_per_worker",
                  "evaluator.gpus_per_worker", "evaluator.threads_per_worker", "evaluator.address",
                  "evaluator.timeout_s", "model.device", "calibration.data_dir")


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Changes from the config a run was started with, outside :data:`FREE_ON_RESUME`."""
    changes = ckpt.fingerprint_changes({k: v for k, v in old.items() if k not in ("name", "output_dir")},
                                       {k: v for k, v in new.items() if k not in ("name", "output_dir")})
    return [c for c in changes if not c.split(":")[0].startswith(FREE_ON_RESUME)]


def _run_search_locked(cfg: SearchConfig, resume: bool, force: bool, generations: int | None,
                       evaluator: Evaluator | None) -> SearchState:
    run_dir = cfg.run_dir
    fp = fingerprint(cfg)
    state = None
    if generations is not None and generations < 0:
        raise UserError(f"--generations must not be negative, got {generations}")
    if resume:
        state, old_fp = ckpt.load_checkpoint(run_dir)
        changes = ckpt.fingerprint_changes(old_fp, fp)
        if (run_dir / ckpt.CONFIG).is_file():
            changes += [c for c in config_changes(_load_yaml(run_dir / ckpt.CONFIG), cfg.to_dict()) if c not in changes]
        if changes and not force:
            raise UserError(f"refusing to resume {run_dir}: the config changed ({'; '.join(changes)}); the search "
                            "would not continue as it began. Start a new run (another name), or pass --force")
        if changes:
            log.warning("resuming despite changes (--force): %s", "; ".join(changes))
    elif (run_dir / ckpt.STATE).exists():
        raise UserError(f"{run_dir} already holds a search; resume it with --resume {run_dir} or choose another name")
    total = generations if generations is not None else cfg.search.generations
    if state is not None and state.generation >= total:
        log.info("%s already has %d generations; nothing to do (use --generations N to go further)", run_dir, state.generation)
        return state
    own = evaluator is None
    evaluator = evaluator or make_evaluator(cfg)
    ckpt.save_config(run_dir, cfg.to_dict())  # only once every check has passed and the evaluator stands

    def on_generation(st: SearchState) -> None:
        ckpt.save_checkpoint(run_dir, st, fp, cfg.search.hall_of_fame)
        ckpt.plot_progress(run_dir, st)
        ckpt.plot_pareto(run_dir, st)

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
        cfg = load_config(args.config) if args.config else config_from_dict(_load_yaml(run_dir / ckpt.CONFIG))
        cfg.output_dir, cfg.name = str(run_dir.parent), run_dir.name
        validate(cfg)
    elif args.config:
        cfg = load_config(args.config)
        if args.name is not None:
            cfg.name = args.name
        if args.output_dir is not None:
            cfg.output_dir = args.output_dir
        validate(cfg)
    else:
        raise UserError("give --config FILE.yaml to start a search, or --resume runs/NAME to continue one")
    if args.dry_run:
        fp = fingerprint(cfg)
        print(json.dumps({"valid": True, "run_dir": str(cfg.run_dir), "fingerprint": fp}, indent=2))
        return
    state = run_search(cfg, resume=bool(args.resume), force=args.force, generations=args.generations)
    for r in ckpt.export_trees(state, 5)["trees"]:
        print(f"{r['rank']:>2}. fitness {r['fitness']:.4f}  size {r['size']:>2}  {r['formula']}")
    if cfg.heldout is not None and cfg.evaluator.type != "reconstruction" and not args.no_heldout:
        print(format_table(run_heldout(cfg.run_dir, cfg, state), cfg.heldout.texts))


HELDOUT = "heldout.json"


def heldout_cells(cfg: SearchConfig, state: SearchState, h: HeldoutSection) -> list[Cell]:
    """The held-out grid of a run: dense, the baselines and the top k, at the run's pattern."""
    c, f = cfg.calibration, cfg.fitness
    if c.source != "wikitext2" or f.text != "wikitext2":
        log.warning("held-out cells calibrate on %s; the run's fitness text is %s", c.source, f.text)
    common = dict(windows=h.windows, seqlen=h.seqlen, nsamples=c.nsamples, calib_seqlen=c.seqlen,
                  calib_seed=c.seed, calib_source=c.source, model=cfg.model.name)
    top = [(f"#{r['rank']}", r["formula"]) for r in ckpt.export_trees(state, h.top_k)["trees"]]
    cells = [known_cell("dense", text=t, **common) for t in h.texts]
    return cells + cells_for(top, [b for b in h.baselines if b != "dense"], [f.pattern], [f.sparsity], h.texts, **common)


def run_heldout(run_dir: Path, cfg: SearchConfig, state: SearchState, h: HeldoutSection | None = None) -> dict[str, Any]:
    """Measure (or finish measuring) the held-out cells of a run; writes RUN/heldout.json."""
    h = h or cfg.heldout or HeldoutSection()
    runner = CellRunner(run_dir / "heldout", cfg.calibration.data_dir, pick_device(cfg.model.device), str(run_dir))
    records = runner.run(heldout_cells(cfg, state, h))
    fitness = {r["formula"]: r["fitness"] for r in ckpt.export_trees(state, max(h.top_k, 1))["trees"]}
    table = summary(records)
    for row in table["rows"]:
        if row["tree"] in fitness:
            row["fitness"] = fitness[row["tree"]]
    table.update(budget={"windows": h.windows, "seqlen": h.seqlen}, texts=list(h.texts),
                 calibration={"nsamples": cfg.calibration.nsamples, "seqlen": cfg.calibration.seqlen,
                              "seed": cfg.calibration.seed, "source": cfg.calibration.source})
    write_json(run_dir / HELDOUT, table, protected=ckpt.run_files(run_dir))
    log.info("held-out perplexity of %d cells in %s", len(records), run_dir / HELDOUT)
    return table


def cmd_heldout(args: argparse.Namespace) -> None:
    run_dir = Path(args.run)
    cfg = _run_config(run_dir)
    state, _ = ckpt.load_checkpoint(run_dir)
    h = cfg.heldout or HeldoutSection()
    h = HeldoutSection(top_k=h.top_k if args.top_k is None else args.top_k, baselines=h.baselines,
                       texts=args.texts.split(",") if args.texts else h.texts,
                       windows=h.windows if args.windows is None else args.windows,
                       seqlen=h.seqlen if args.seqlen is None else args.seqlen)
    cfg.heldout = h
    validate(cfg)
    print(format_table(run_heldout(run_dir, cfg, state, h), h.texts))


def cmd_export(args: argparse.Namespace) -> None:
    run_dir = Path(args.run)
    if args.top < 1:
        raise UserError(f"--top must be at least 1, got {args.top}")
    state, _ = ckpt.load_checkpoint(run_dir)
    data = ckpt.export_pareto(state) if args.pareto else ckpt.export_trees(state, args.top)
    if not data["trees"]:
        raise UserError(f"{run_dir} has no evaluated metric yet")
    default = "pareto.json" if args.pareto else "export.json"
    out = Path(args.out) if args.out else run_dir / default
    protected = ckpt.run_files(run_dir)
    write_json(out, data, protected)
    if args.tree_files:
        for r in data["trees"]:
            write_json(out.parent / f"{out.stem}-rank{r['rank']}.json", r["tree"], protected)
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
    p.add_argument("--no-heldout", action="store_true", help="skip the held-out evaluation at the end")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("heldout", help="held-out perplexity of a run's best metrics and the baselines (resumable)")
    p.add_argument("run", help="run folder (runs/NAME)")
    p.add_argument("--top-k", type=int, default=None, help="metrics of the hall of fame to measure (default: the config's)")
    p.add_argument("--texts", default=None, help="comma separated: wikitext2:test,c4:validation")
    p.add_argument("--windows", type=int, default=None, help="evaluation windows per text (default: the config's)")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per evaluation window")
    p.set_defaults(func=cmd_heldout)

    p = sub.add_parser("export", help="write the best trees of a run in the Pruner-Zero JSON format")
    p.add_argument("run", help="run folder (runs/NAME)")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--out", default=None, help="output JSON (default RUN/export.json); loadable by prune --tree")
    p.add_argument("--tree-files", action="store_true", help="also write one bare tree file per rank")
    p.add_argument("--pareto", action="store_true", help="export the Pareto front of fitness against size instead")
    p.set_defaults(func=cmd_export)
