"""``prunerzero search`` and ``prunerzero export``: run, resume and export searches."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from prunerzero.config import HeldoutSection, SearchConfig
from prunerzero.environment import differences, environment
from prunerzero.errors import UserError
from prunerzero.evaluation.heldout import (
    Cell,
    CellRunner,
    cells_for,
    known_cell,
    summary,
)
from prunerzero.files import RUN_START_FILES, RUN_STATS_PREFIXES, is_run_folder, load_yaml, read_json, write_json
from prunerzero.fitness.allocation_fitness import AllocationEvaluator
from prunerzero.fitness.base import Evaluator, mask_cache_key
from prunerzero.fitness.model_fitness import InProcessEvaluator, ModelFitness
from prunerzero.fitness.multi_fidelity import MultiFidelityEvaluator
from prunerzero.fitness.multi_setting import MultiSettingEvaluator, settings_for
from prunerzero.fitness.ray_pool import RayEvaluator, RaySettings
from prunerzero.fitness.reconstruction import ReconstructionEvaluator
from prunerzero.models import pick_device
from prunerzero.primitives.deap_set import space_fingerprint
from prunerzero.primitives.known import resolve_tree
from prunerzero.primitives.registry import FEATURES
from prunerzero.primitives.tree import Tree
from prunerzero.pruning.calibration import Calibration
from prunerzero.runfolder import best_trees, fitness_settings, run_config
from prunerzero.search import checkpoint as ckpt
from prunerzero.search.engine import GeneticSearch
from prunerzero.search.state import SearchState

log = logging.getLogger(__name__)


def fingerprint(cfg: SearchConfig) -> dict[str, Any]:
    """What a resumed run must share with the original: search space, fitness, algorithm, seed."""
    s = cfg.search
    if cfg.evaluator.type == "reconstruction":
        fit: dict[str, Any] = {"evaluator": "reconstruction", "sparsity": cfg.fitness.sparsity, "pattern": cfg.fitness.pattern}
    else:
        fit = fitness_settings(cfg, resolve_device=False).fingerprint()
        if cfg.fitness.settings is not None:  # runs without several settings keep the fingerprint they had
            fit["settings"] = [dict(sorted(e.items())) for e in cfg.fitness.settings]
            fit["reference"] = str(resolve_tree(cfg.fitness.reference))
        if cfg.fitness.multi_fidelity is not None:  # estimated fitnesses depend on it
            mf = cfg.fitness.multi_fidelity
            fit["multi_fidelity"] = {"low_windows": mf.low_windows, "promote": mf.promote}
    space = {"operators": sorted(s.operators), "terminals": sorted(s.terminals),
             "semantics": space_fingerprint(s.operators, s.terminals, s.constants)}
    if s.constants:  # runs without constants keep the fingerprint they were written with
        space["constants"] = sorted(s.constants, key=float)
        space["constants_as_leaves"] = s.constants_as_leaves
    if s.space == "allocation":  # metric searches keep the fingerprint they were written with
        a = cfg.fitness.allocation
        space["allocation"] = {"metric": str(resolve_tree(s.metric)), "lam": a.lam, "m": a.m, "range": list(a.range)}
    fp = {"space": space, "fitness": fit, "algorithm": s.algorithm, "seed": cfg.seed}
    if s.distinct_masks:  # runs without it keep the fingerprint they were written with
        fp["distinct_masks"] = True
    return fp


def make_evaluator(cfg: SearchConfig) -> Evaluator:
    evaluator = model_evaluator(cfg)
    mf = cfg.fitness.multi_fidelity
    if mf is None:
        return evaluator
    return MultiFidelityEvaluator(evaluator, mf.low_windows, mf.promote)


def model_evaluator(cfg: SearchConfig) -> Evaluator:
    e = cfg.evaluator
    if e.type == "reconstruction":
        return ReconstructionEvaluator(sparsity=cfg.fitness.sparsity, pattern=cfg.fitness.pattern, seed=cfg.seed)
    if e.type == "ray":
        return RayEvaluator(fitness_settings(cfg), cfg.run_dir, RaySettings(
            workers=e.workers, cpus_per_worker=e.cpus_per_worker, gpus_per_worker=e.gpus_per_worker,
            threads_per_worker=e.threads_per_worker, address=e.address, timeout_s=e.timeout_s),
            gradients="G" in cfg.search.terminals)
    if cfg.search.space == "allocation":
        return _allocation_evaluator(cfg, cfg.run_dir)
    if cfg.fitness.settings is not None:
        return MultiSettingEvaluator(settings_for(fitness_settings(cfg), cfg.fitness.settings), cfg.run_dir,
                                     resolve_tree(cfg.fitness.reference), gradients="G" in cfg.search.terminals)
    fitness = ModelFitness(fitness_settings(cfg), cfg.run_dir, gradients="G" in cfg.search.terminals)
    return InProcessEvaluator(fitness_settings(cfg), cfg.run_dir, fitness)


def _allocation_evaluator(cfg: SearchConfig, run_dir: Path) -> AllocationEvaluator:
    """An allocation run's evaluator: its fixed metric's fitness; G loaded only if that metric reads it."""
    a = cfg.fitness.allocation
    metric = resolve_tree(cfg.search.metric)
    return AllocationEvaluator(ModelFitness(fitness_settings(cfg), run_dir, gradients="G" in metric.terminals),
                               metric, a.lam, a.m, a.range)


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
               evaluator: Evaluator | None = None, max_minutes: float | None = None) -> SearchState:
    """Start or continue the search of ``cfg`` in ``cfg.run_dir``; checkpoint after every generation.
    With ``max_minutes``, no generation is begun once that much time has passed since the call
    (loading included): the run stops at a checkpoint, short of its generations, and resumes exactly."""
    if max_minutes is not None and not 0 < max_minutes < float("inf"):
        raise UserError(f"--max-minutes must be a positive number of minutes, got {max_minutes}")
    deadline = None if max_minutes is None else time.monotonic() + 60 * max_minutes
    run_dir = cfg.run_dir
    check_run_folder(run_dir, resume)
    with ckpt.run_lock(run_dir):
        return _run_search_locked(cfg, resume, force, generations, evaluator, deadline)


def _made_by_a_start(name: str) -> bool:
    """Files a search writes into its folder before its first checkpoint (a start that failed or was stopped
    early): a new start in that folder reuses the statistics files whose names match its calibration."""
    return (name in RUN_START_FILES or name.startswith(".")
            or (name.endswith(".safetensors") and name.startswith(RUN_STATS_PREFIXES)))


def check_run_folder(run_dir: Path, resume: bool) -> None:
    """A search writes only into its own run folder: a new run's folder is new, empty, or left by a start
    that failed before its first checkpoint; never a file, never a folder holding a user's files."""
    run_dir = Path(run_dir)
    for parent in run_dir.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"output_dir {parent} is a file, not a folder; give --output-dir a folder")
            break
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir} is a file, not a run folder; choose another --name (or --output-dir)")
    if resume or not run_dir.is_dir() or is_run_folder(run_dir):
        return
    foreign = sorted(p.name for p in run_dir.iterdir() if not _made_by_a_start(p.name))
    if foreign:
        shown = ", ".join(foreign[:4]) + (" ..." if len(foreign) > 4 else "")
        raise UserError(f"{run_dir} exists and is not a search run (it holds {shown}); a search would write over "
                        "such files: choose another --name (or --output-dir)")


# Config keys a resumed run may change without --force: how long it runs (or waits for a better
# best), where and how fast it evaluates, and what is measured after it. Everything else changes what the search does.
FREE_ON_RESUME = ("search.generations", "search.patience", "search.min_improvement", "heldout",
                  "evaluator.workers", "evaluator.cpus_per_worker",
                  "evaluator.gpus_per_worker", "evaluator.threads_per_worker", "evaluator.address",
                  "evaluator.timeout_s", "model.device", "calibration.data_dir")


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Changes from the config a run was started with, outside :data:`FREE_ON_RESUME`."""
    changes = ckpt.fingerprint_changes({k: v for k, v in old.items() if k not in ("name", "output_dir")},
                                       {k: v for k, v in new.items() if k not in ("name", "output_dir")})
    return [c for c in changes if not c.split(":")[0].startswith(FREE_ON_RESUME)]


def _run_search_locked(cfg: SearchConfig, resume: bool, force: bool, generations: int | None,
                       evaluator: Evaluator | None, deadline: float | None = None) -> SearchState:
    run_dir = cfg.run_dir
    fp = fingerprint(cfg)
    state = None
    if generations is not None and generations < 0:
        raise UserError(f"--generations must not be negative, got {generations}")
    if resume:
        state, old_fp = ckpt.load_checkpoint(run_dir)
        check_state_belongs(run_dir, state)
        changes = ckpt.fingerprint_changes(old_fp, fp)
        if (run_dir / ckpt.CONFIG).is_file():
            changes += [c for c in config_changes(load_yaml(run_dir / ckpt.CONFIG, "run config"), cfg.to_dict()) if c not in changes]
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
    _record_environment(run_dir)

    def on_generation(st: SearchState) -> None:
        ckpt.save_checkpoint(run_dir, st, fp, cfg.search.hall_of_fame)
        ckpt.plot_progress(run_dir, st)
        ckpt.plot_pareto(run_dir, st)
        if isinstance(evaluator, AllocationEvaluator):
            write_best_allocation(run_dir, cfg, st, evaluator)

    try:
        if state is not None:
            evaluator.remember(known_masks(state, cfg))
        search = GeneticSearch(cfg.search, evaluator, cfg.seed, state, on_generation, deadline)
        start = time.perf_counter()
        state = search.run(total)
        if search.stop_reason == "stalled":
            p = cfg.search
            log.info("stopped after generation %d of %d: the best fitness gained less than %g%% in the last %d "
                     "generations (search.patience); raise search.patience to go on", state.generation, total,
                     100 * p.min_improvement, p.patience)
        elif state.generation < total:
            log.info("stopped after generation %d of %d: the time budget (--max-minutes) is spent; continue with "
                     "prunerzero search --resume %s", state.generation, total, run_dir)
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


def check_state_belongs(run_dir: Path, state: SearchState) -> None:
    """The checkpoint must be the one the run folder's config wrote: a state.json copied from another
    run (another population size) would otherwise go on with that run's population."""
    if not (run_dir / ckpt.CONFIG).is_file() or state.generation < 0:
        return
    saved = load_yaml(run_dir / ckpt.CONFIG, "run config")
    size = ((saved or {}).get("search") or {}).get("population") if isinstance(saved, dict) else None
    if isinstance(size, int) and len(state.population) != size:
        raise UserError(f"{run_dir / ckpt.STATE} holds a population of {len(state.population)} but the run's "
                        f"{ckpt.CONFIG} says search.population: {size}: the checkpoint belongs to another run; put "
                        "this run's own state.json back, or start a new run from that checkpoint's folder")


ENVIRONMENT = "environment.json"


def _record_environment(run_dir: Path) -> None:
    """Write RUN/environment.json on the first start; on a resume, say what differs from it."""
    path, now = run_dir / ENVIRONMENT, environment()
    if path.is_file():
        try:
            changed = differences(read_json(path, "environment record"), now)
        except UserError:
            changed = [f"{ENVIRONMENT} unreadable"]
        if changed:
            log.warning("this run started on another software or hardware environment; fitnesses may differ in their "
                        "last digits and the search may take another path than it would have: %s", "; ".join(changed))
        return
    write_json(path, now)


ALLOCATION = "allocation.json"


def write_best_allocation(run_dir: Path, cfg: SearchConfig, state: SearchState, evaluator: AllocationEvaluator) -> None:
    """RUN/allocation.json: the best allocation function so far, as the per-layer sparsities that
    ``prune --allocation`` loads, with the fitness of OWL and uniform on the same text."""
    best = state.hall_of_fame(1)
    if not best:
        return
    evaluator.write(Tree.parse(best[0]["tree"]), run_dir / ALLOCATION, best[0]["fitness"], run=cfg.name,
                    generation=state.generation, reference=evaluator.reference_fitness(),
                    made_with=f"prunerzero search (seed {cfg.seed}); calibration {cfg.calibration.nsamples} x "
                              f"{cfg.calibration.seqlen} {cfg.calibration.source}, fitness {cfg.fitness.windows} x "
                              f"{cfg.fitness.seqlen} {cfg.fitness.text} {cfg.fitness.split}")


def apply_allocation_function(run_dir: Path, sparsity: float, out: Path, function: str | None = None) -> dict[str, Any]:
    """Write the allocation an allocation run's function (its best, or ``function``) gives at another
    target ``sparsity``: the run's model, statistics, metric, lambda, M and range; no fitness is measured."""
    cfg = run_config(run_dir)
    if cfg.search.space != "allocation":
        raise UserError(f"{run_dir} searched metrics, not allocation functions; allocate needs an allocation run "
                        "(search.space: allocation)")
    a = cfg.fitness.allocation
    if not 0 <= a.range[0] <= sparsity <= a.range[1] < 1:
        raise UserError(f"--sparsity {sparsity} is outside the run's allocation range {a.range}")
    chosen = "given" if function is not None else "the run's best"
    if function is None:
        state, _ = ckpt.load_checkpoint(run_dir)
        best = state.hall_of_fame(1)
        if not best:
            raise UserError(f"{run_dir} has no evaluated allocation function yet; give one with --function")
        function = best[0]["tree"]
    tree = Tree.parse(function)
    if not tree.terminals or not tree.terminals <= set(FEATURES):
        raise UserError(f"{tree} is not an allocation function: its leaves must be among {', '.join(FEATURES)}")
    found_at, cfg.fitness.sparsity = cfg.fitness.sparsity, sparsity
    evaluator = _allocation_evaluator(cfg, run_dir)
    return evaluator.write(tree, out, None, run=cfg.name, found_at=found_at, function_from=chosen,
                           made_with=f"prunerzero allocate {run_dir.name} --sparsity {sparsity}: the function found by "
                                     f"the run, applied at this target; fitness not measured")


HELDOUT = "heldout.json"


def heldout_calibration(cfg: SearchConfig) -> Calibration:
    """The windows held-out cells calibrate X and G on (as ``prunerzero prune`` does, one set for
    both): G's when the run computed G from windows of its own, so G has the scale it had in the
    search, else the run's calibration."""
    return fitness_settings(cfg, resolve_device=False).g_calibration


def heldout_cells(cfg: SearchConfig, state: SearchState, h: HeldoutSection) -> list[Cell]:
    """The held-out grid of a run: dense, the baselines and the top k, at the run's pattern."""
    c, f = cfg.calibration, cfg.fitness
    if c.source != "wikitext2" or f.text != "wikitext2":
        log.warning("held-out cells calibrate on %s; the run's fitness text is %s", c.source, f.text)
    calib = heldout_calibration(cfg)
    common = dict(windows=h.windows, seqlen=h.seqlen, nsamples=calib.nsamples, calib_seqlen=calib.seqlen,
                  calib_seed=c.seed, calib_source=c.source, model=cfg.model.name)
    top = [(f"#{r['rank']}", r["formula"]) for r in best_trees(state, h.top_k)]
    cells = [known_cell("dense", text=t, **common) for t in h.texts]
    return cells + cells_for(top, [b for b in h.baselines if b != "dense"], [f.pattern], [f.sparsity], h.texts,
                             tree_settings=dict(update=f.update, obs_scope=f.obs_scope) if f.update != "none" else {},
                             **common)


def run_heldout(run_dir: Path, cfg: SearchConfig, state: SearchState, h: HeldoutSection | None = None) -> dict[str, Any]:
    """Measure (or finish measuring) the held-out cells of a run; writes RUN/heldout.json."""
    if cfg.evaluator.type == "reconstruction":
        raise UserError(f"{run_dir} was searched with the reconstruction evaluator (a random layer, no model): it has "
                        "no held-out perplexity; measure a metric with prunerzero prune --method tree --tree FORMULA")
    if cfg.search.space == "allocation":
        raise UserError(f"{run_dir} searched allocation functions, not metrics; measure its result with prunerzero "
                        f"prune --method {cfg.search.metric} --allocation {run_dir / ALLOCATION}")
    h = h or cfg.heldout or HeldoutSection()
    runner = CellRunner(run_dir / "heldout", cfg.calibration.data_dir, pick_device(cfg.model.device), str(run_dir))
    records = runner.run(heldout_cells(cfg, state, h))
    calib = heldout_calibration(cfg)
    fitness = {r["formula"]: r["fitness"] for r in ckpt.export_trees(state, max(h.top_k, 1))["trees"]}
    table = summary(records)
    for row in table["rows"]:
        if row["tree"] in fitness:
            row["fitness"] = fitness[row["tree"]]
    table.update(budget={"windows": h.windows, "seqlen": h.seqlen}, texts=list(h.texts),
                 calibration={"nsamples": calib.nsamples, "seqlen": calib.seqlen,
                              "seed": calib.seed, "source": calib.source})
    write_json(run_dir / HELDOUT, table)
    log.info("held-out perplexity of %d cells in %s", len(records), run_dir / HELDOUT)
    return table
