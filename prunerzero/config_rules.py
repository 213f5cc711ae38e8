"""The cross-field rules of a search config: impossible combinations refused with the way out.

:mod:`prunerzero.config` builds the typed sections from YAML (names, types, limits); the rules
here see the whole config at once (``validate``), at the edge: at ``--dry-run`` and before a
search starts or resumes. Name lists come from :mod:`prunerzero.choices`.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from prunerzero.choices import (
    ALGORITHMS,
    ALLOCATIONS,
    BASELINE_NAMES,
    EVALUATORS,
    HELDOUT_TEXTS,
    OBS_SCOPES,
    SPACES,
    STATS_MODES,
    UPDATES,
    allocation_needs_unstructured,
    check_allocation,
    choose,
    choose_all,
)
from prunerzero.data import check_text
from prunerzero.errors import UserError, short_repr
from prunerzero.primitives.known import KNOWN_METRICS, metric_only, resolve_tree, shipped_trees, tree_update
from prunerzero.primitives.registry import FEATURES, OBS_TERMINALS, OPERATORS, TERMINALS, constant_name
from prunerzero.primitives.tree import Tree
from prunerzero.pruning.masks import Pattern, check_sparsity

if TYPE_CHECKING:
    from prunerzero.config import SearchConfig, SearchSection

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_run_name(name: Any, where: str = "name") -> str:
    """A run name is a plain folder name: no separators, no '.' or '..', no absolute path."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or name in (".", ".."):
        raise UserError(f"{where} must be a plain folder name (letters, digits, '.', '_', '-'; no '/'), got {name!r}")
    return name


def _positive(value: float, where: str) -> None:
    if value <= 0:
        raise UserError(f"{where} must be positive, got {value}")


def validate(cfg: SearchConfig) -> SearchConfig:
    """Cross-field checks: impossible values are refused with the way out."""
    s, f, e, c = cfg.search, cfg.fitness, cfg.evaluator, cfg.calibration
    check_sparsity(f.sparsity, Pattern.parse(f.pattern))
    check_text(c.source, c.split, "calibration", c.data_dir)  # the test split never calibrates nor selects
    check_text(f.text, f.split, "fitness", c.data_dir)
    choose(f.stats_mode, STATS_MODES, "fitness.stats_mode")
    choose(s.algorithm, ALGORITHMS, "search.algorithm")
    choose(e.type, EVALUATORS, "evaluator.type")
    for name in ("population", "generations", "tournament_size", "max_height", "max_size", "hall_of_fame",
                 "top_k", "steps_per_generation", "init_max_depth"):
        _positive(getattr(s, name), f"search.{name}")
    for name in ("nsamples", "seqlen", "gradient_nsamples", "gradient_seqlen"):
        if getattr(c, name) is not None:
            _positive(getattr(c, name), f"calibration.{name}")
    for name in ("seqlen", "windows"):
        _positive(getattr(f, name), f"fitness.{name}")
    mf = f.multi_fidelity
    if mf is not None:
        if e.type == "reconstruction":
            raise UserError("fitness.multi_fidelity needs a model evaluator (inprocess or ray), not reconstruction")
        if not 0 < mf.low_windows < f.windows:
            raise UserError(f"fitness.multi_fidelity.low_windows must be within [1, fitness.windows - 1 = "
                            f"{f.windows - 1}], got {mf.low_windows}; raise fitness.windows or drop multi_fidelity")
        if not 0 < mf.promote <= 1:
            raise UserError(f"fitness.multi_fidelity.promote must be a fraction in (0, 1], got {mf.promote}")
    for name in ("workers", "threads_per_worker", "timeout_s"):
        _positive(getattr(e, name), f"evaluator.{name}")
    if e.cpus_per_worker < 0 or e.gpus_per_worker < 0:
        raise UserError("evaluator.cpus_per_worker and gpus_per_worker must not be negative")
    for name in ("crossover_prob", "mutation_prob"):
        if not 0 <= getattr(s, name) <= 1:
            raise UserError(f"search.{name} must be within [0, 1], got {getattr(s, name)}")
    if s.init_min_depth < 0 or s.init_min_depth > s.init_max_depth:
        raise UserError(f"search.init_min_depth must be within [0, init_max_depth={s.init_max_depth}], got {s.init_min_depth}")
    if s.init_max_depth > s.max_height:
        raise UserError(f"search.init_max_depth ({s.init_max_depth}) exceeds search.max_height ({s.max_height})")
    if s.elites >= s.population or s.elites < 0:
        raise UserError(f"search.elites must be within [0, population), got {s.elites}")
    if s.distinct_masks and s.algorithm != "steady_state":
        raise UserError("search.distinct_masks needs search.algorithm: steady_state (a generational population is "
                        "replaced whole); set algorithm: steady_state or remove distinct_masks")
    if s.patience is not None and (isinstance(s.patience, bool) or not isinstance(s.patience, int) or s.patience < 1):
        raise UserError(f"search.patience must be a whole number of generations, at least 1, got {short_repr(s.patience)}; "
                        "remove it to run all search.generations")
    if not isinstance(s.min_improvement, (int, float)) or not 0 <= s.min_improvement < 1:
        raise UserError(f"search.min_improvement must be a fraction within [0, 1) (0.001 is 0.1%), got "
                        f"{short_repr(s.min_improvement)}")
    if s.in_flight is not None:
        if s.algorithm != "steady_state":
            raise UserError("search.in_flight needs search.algorithm: steady_state")
        if s.batch is not None:
            raise UserError("search.in_flight and search.batch exclude each other: in_flight breeds a child as each "
                            "result comes in; remove one of them")
        if not 0 < s.in_flight <= s.population:
            raise UserError(f"search.in_flight must be within [1, population={s.population}], got {s.in_flight}")
        if cfg.fitness.multi_fidelity is not None:
            raise UserError("search.in_flight cannot be used with fitness.multi_fidelity (a rung ranks a whole batch); "
                            "use search.batch, or remove fitness.multi_fidelity")
    if s.batch is not None and not 0 < s.batch <= s.steps_per_generation:
        raise UserError(f"search.batch must be within [1, steps_per_generation={s.steps_per_generation}], got {s.batch}")
    if s.algorithm == "steady_state" and (s.top_k < 2 or s.top_k > s.population):
        raise UserError(f"search.top_k must be within [2, population={s.population}], got {s.top_k}")
    if s.tournament_size > s.population:
        raise UserError(f"search.tournament_size ({s.tournament_size}) exceeds the population ({s.population})")
    choose_all(s.operators, sorted(OPERATORS), "search.operators")
    choose(s.space, SPACES, "search.space")
    _check_update(cfg)
    _check_settings(cfg)
    leaves = (TERMINALS + (tuple(OBS_TERMINALS) if f.update == "obs" else ())) if s.space == "metric" else tuple(FEATURES)
    bad = [t for t in s.terminals if t not in leaves]
    if bad or not s.terminals:
        hint = "" if s.space == "metric" else f" (allocation features: {'; '.join(f'{k}: {v}' for k, v in FEATURES.items())})"
        raise UserError(f"search.terminals must be a non-empty subset of {', '.join(leaves)} for search.space: "
                        f"{s.space}, got {s.terminals}{hint}")
    if s.space == "allocation":
        _check_allocation_search(cfg)
    _check_seed_trees(s)
    if len(set(s.operators)) != len(s.operators) or len(set(s.terminals)) != len(s.terminals):
        raise UserError("search.operators and search.terminals must not repeat names")
    if len(set(s.constants)) != len(s.constants):
        raise UserError("search.constants must not repeat values")
    if "pow" in s.operators and not s.constants:
        raise UserError("search.operators has pow, which needs constant exponents: list some in search.constants "
                        "(e.g. [0.25, 0.5, 2]) or drop pow")
    a = f.allocation
    if a is not None:
        choose(a.method, ALLOCATIONS if s.space == "metric" else ("searched",),
               f"fitness.allocation.method with search.space: {s.space}")
        allocation_needs_unstructured(Pattern.parse(f.pattern).structured, f"fitness.pattern: {f.pattern}")
        low, high = a.range
        if not 0 <= low <= f.sparsity <= high < 1:
            raise UserError(f"fitness.allocation.range {a.range} cannot reach the target sparsity {f.sparsity}; "
                            "it needs 0 <= LOW <= sparsity <= HIGH < 1")
        if not 0 <= a.lam < 1 or a.m <= 0:
            raise UserError(f"fitness.allocation needs 0 <= lam < 1 and m > 0, got lam {a.lam}, m {a.m}")
    if c.source == "c4" and f.text == "c4":
        raise UserError("calibration.source and fitness.text are both c4: their windows could overlap; use "
                        "fitness.text: wikitext2 (validation), whose windows are kept apart from calibration windows")
    h = cfg.heldout
    if h is not None:
        if h.top_k < 0:
            raise UserError(f"heldout.top_k must not be negative, got {h.top_k}")
        _positive(h.seqlen, "heldout.seqlen")
        if h.windows is not None:
            _positive(h.windows, "heldout.windows")
        if not h.texts:
            raise UserError(f"heldout.texts must list some of {', '.join(HELDOUT_TEXTS)}")
        choose_all(h.texts, HELDOUT_TEXTS, "heldout.texts")
        choose_all(h.baselines, BASELINE_NAMES, "heldout.baselines")
    check_run_name(cfg.name)
    return cfg


def seed_tree(spec: str, space: str) -> Tree:
    """A ``search.seed_trees`` entry as a tree: a formula, or (metric space) a known or shipped name."""
    if space == "metric" and (spec in KNOWN_METRICS or spec in shipped_trees()):
        return resolve_tree(spec)
    # a formula only, never a file: the config alone must say what generation 0 holds
    return Tree.parse(spec) if space == "allocation" else metric_only(Tree.parse(spec))


def _check_settings(cfg: SearchConfig) -> None:
    """``fitness.settings``: each a valid (sparsity, pattern, allocation); scored in-process, metrics only."""
    s, f = cfg.search, cfg.fitness
    if f.settings is None:
        return
    if s.space != "metric" or cfg.evaluator.type != "inprocess":
        raise UserError("fitness.settings (several settings at once) scores metrics in-process for now: set "
                        "search.space: metric and evaluator.type: inprocess, or remove fitness.settings")
    for i, entry in enumerate(f.settings):
        where = f"fitness.settings[{i}]"
        pattern = Pattern.parse(entry.get("pattern", "unstructured"))
        if "sparsity" in entry or not pattern.structured:
            check_sparsity(entry.get("sparsity", f.sparsity), pattern)
        check_allocation(entry.get("allocation"), pattern.structured, f"{where}.allocation", files=False)
    reference = metric_only(resolve_tree(f.reference))
    if "D" in reference.terminals and f.update != "obs":
        raise UserError(f"fitness.reference {f.reference} reads D, which exists only inside the OBS update")


def _check_update(cfg: SearchConfig) -> None:
    """``fitness.update: obs`` (the rule inside SparseGPT's update): a metric search evolves that rule, an
    allocation search prunes its fixed metric with it; the D terminal exists only there."""
    s, f = cfg.search, cfg.fitness
    choose(f.update, UPDATES, "fitness.update")
    choose(f.obs_scope, OBS_SCOPES, "fitness.obs_scope")
    if s.space == "metric" and "D" in s.terminals and f.update != "obs":
        raise UserError("search.terminals has D (1 / [H^-1]_jj), which exists only inside the OBS update: set "
                        "fitness.update: obs, or drop D")
    if f.update == "obs" and cfg.evaluator.type == "reconstruction":
        raise UserError("fitness.update: obs needs a model evaluator (inprocess or ray), not reconstruction")


def _check_seed_trees(s: SearchSection) -> None:
    """Every seed must be a tree of this search's space, so generation 0 holds it as written."""
    if not isinstance(s.seed_trees, list):
        raise UserError(f"search.seed_trees must be a list of formulas, got {short_repr(s.seed_trees)}")
    if len(s.seed_trees) > s.population:
        raise UserError(f"search.seed_trees has {len(s.seed_trees)} trees, more than search.population "
                        f"({s.population}); drop some or raise the population")
    for i, spec in enumerate(s.seed_trees):
        where = f"search.seed_trees[{i}]"
        if not isinstance(spec, str):
            raise UserError(f"{where} must be a formula such as mul(abs(W), sqrt(X)), got {short_repr(spec)}")
        try:
            tree = seed_tree(spec, s.space)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        outside = sorted((tree.terminals - set(s.terminals)) | (tree.operators - set(s.operators)))
        outside += sorted(tree.constants - {constant_name(c) for c in s.constants})
        if outside:
            raise UserError(f"{where} {tree} uses {', '.join(outside)}, not in this search's operators, terminals "
                            "or constants; add them there or drop the seed")
        if tree.height > s.max_height or len(tree) > s.max_size:
            raise UserError(f"{where} {tree} has height {tree.height} and size {len(tree)}, beyond search.max_height "
                            f"{s.max_height} or max_size {s.max_size}; raise those or drop the seed")


def _check_allocation_search(cfg: SearchConfig) -> None:
    """An allocation search: functions over per-layer features, the metric fixed."""
    s, f = cfg.search, cfg.fitness
    axis = [o for o in s.operators if OPERATORS[o].axis is not None]
    if axis:
        raise UserError(f"search.operators {', '.join(axis)} work along a weight's rows or columns; an allocation "
                        "function reads one value per layer: drop them")
    if f.allocation is None:
        raise UserError("search.space: allocation needs fitness.allocation: {method: searched, lam: 0.08, range: "
                        "[0.0, 0.99]} (lam: how far a layer may move from the target, as OWL's lambda)")
    if cfg.evaluator.type != "inprocess":
        raise UserError(f"search.space: allocation runs in-process only; set evaluator.type: inprocess, not "
                        f"{cfg.evaluator.type}")
    if f.multi_fidelity is not None:
        raise UserError("search.space: allocation does not take fitness.multi_fidelity; remove it")
    if cfg.heldout is not None:
        raise UserError("the heldout section is for metric searches; measure an allocation run's result with "
                        "prunerzero prune --allocation runs/NAME/allocation.json (remove heldout)")
    metric = metric_only(resolve_tree(s.metric))
    if "D" in metric.terminals and f.update != "obs":
        raise UserError(f"search.metric {s.metric} reads D (1 / [H^-1]_jj), which exists only inside the OBS update: "
                        "set fitness.update: obs, or choose a metric of W, G and X")
    if "D" in metric.terminals and f.stats_mode != "once":
        # the features score the dense model with the metric, and D comes from the run's stored factors
        raise UserError(f"search.metric {s.metric} reads D, which the allocation features take from the dense "
                        "model's OBS factors (fitness.stats_mode: once); set stats_mode: once, or choose a metric "
                        "without D")
    if tree_update(s.metric) == "obs" and f.update != "obs":
        raise UserError(f"search.metric {s.metric} is a rule inside the OBS update (its file records update: obs): "
                        "set fitness.update: obs to prune with it as it was found")
