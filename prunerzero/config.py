"""The search configuration: YAML in, validated dataclasses out.

Validation happens here, at the edge: unknown keys (with a "did you mean"), wrong types and
impossible values are named with their place in the file (``search.population``).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prunerzero.data import check_text
from prunerzero.errors import UserError
from prunerzero.primitives.known import KNOWN_METRICS, metric_only, resolve_tree, shipped_trees
from prunerzero.primitives.registry import (
    CONSTANTS,
    DEFAULT_OPERATORS,
    FEATURES,
    OPERATORS,
    TERMINALS,
    constant_name,
    is_constant,
)
from prunerzero.primitives.tree import Tree
from prunerzero.pruning.masks import Pattern, check_sparsity

log = logging.getLogger(__name__)


@dataclass
class ModelSection:
    name: str = "smollm2-135m"
    device: str = "auto"


@dataclass
class CalibrationSection:
    source: str = "wikitext2"
    split: str = "validation"
    nsamples: int = 32
    seqlen: int = 2048
    seed: int = 0
    data_dir: typing.Optional[str] = None
    # G from other windows than X (same source, split and seed; null: X's). A sequential search
    # re-collects X per candidate, so it keeps X's windows few; G is computed once per run, and its
    # scale follows the window count (a sum over windows), so a metric that mixes G with X or W
    # keeps its balance only when G is calibrated as it will be when used (32 x 2048 in the table).
    gradient_nsamples: typing.Optional[int] = None
    gradient_seqlen: typing.Optional[int] = None


@dataclass
class AllocationSection:
    """Layerwise sparsity for the search's fitness (unstructured only): exact global counts."""

    method: str = "owl"  # uniform or owl; "searched" in an allocation search (search.space: allocation)
    m: float = 5.0  # OWL's outlier threshold
    lam: float = 0.08  # OWL's range: block sparsities within +-lam of the target
    range: list = field(default_factory=lambda: [0.0, 0.99])  # every layer's sparsity stays in it


@dataclass
class FitnessSection:
    sparsity: float = 0.5
    pattern: str = "unstructured"
    text: str = "wikitext2"
    split: str = "validation"
    seqlen: int = 1024
    windows: int = 2
    stats_mode: str = "once"
    # None: every candidate on the full budget. Else one rung of successive halving per batch.
    multi_fidelity: typing.Optional["MultiFidelitySection"] = None
    allocation: typing.Optional[AllocationSection] = None  # null: every layer at `sparsity`


@dataclass
class MultiFidelitySection:
    low_windows: int = 1  # budget of the first rung, a prefix of fitness.windows
    promote: float = 0.25  # fraction of each batch measured again on the full budget


@dataclass
class HeldoutSection:
    """Held-out evaluation at the end of a search (and ``prunerzero heldout RUN``): the top k of
    the hall of fame and the baselines, pruned with the run's calibration at its sparsity and
    pattern, measured on the test texts. The fitness text is never one of them."""

    top_k: int = 3
    baselines: list = field(default_factory=lambda: ["magnitude", "wanda", "ria", "sparsegpt", "pruner-zero"])
    texts: list = field(default_factory=lambda: ["wikitext2:test", "c4:validation"])
    windows: typing.Optional[int] = 8  # evaluation windows per text; null: the whole split
    seqlen: int = 1024


@dataclass
class SearchSection:
    algorithm: str = "generational"  # or steady_state (the paper's loop)
    population: int = 20
    generations: int = 10
    operators: list = field(default_factory=lambda: list(DEFAULT_OPERATORS))
    terminals: list = field(default_factory=lambda: list(TERMINALS))
    constants: list = field(default_factory=list)  # numeric leaves (and pow exponents), e.g. [0.25, 0.5, 2]
    constants_as_leaves: bool = True  # false: constants appear only as pow exponents
    init_min_depth: int = 1
    init_max_depth: int = 3
    tournament_size: int = 3
    crossover_prob: float = 0.7
    mutation_prob: float = 0.3
    max_height: int = 8
    max_size: int = 31
    elites: int = 2
    hall_of_fame: int = 10
    seed_known_metrics: bool = True
    seed_trees: list = field(default_factory=list)  # formulas (or known/shipped metric names) put in generation 0
    top_k: int = 10  # steady state: parents are drawn from the current top k
    steps_per_generation: int = 10  # steady state: children bred per generation (the checkpoint unit)
    batch: typing.Optional[int] = None  # steady state: children bred between replacements (1: the paper's; null: a generation's)
    in_flight: typing.Optional[int] = None  # steady state without barrier: children out for evaluation at once
    distinct_masks: bool = False  # steady state: a child that prunes exactly as a member (same masks) replaces no one else
    patience: typing.Optional[int] = None  # stop once the best fitness has not improved for this many generations
    min_improvement: float = 0.0  # with patience: the relative gain that counts as improving (0.001: 0.1%)
    regenerate_attempts: int = 5
    space: str = "metric"  # metric: evolve pruning metrics; allocation: evolve per-layer sparsity functions
    metric: str = "wanda"  # allocation space: the fixed metric (a known name, shipped name or formula)


@dataclass
class EvaluatorSection:
    type: str = "inprocess"  # inprocess, ray, or reconstruction (a cheap stand-in, for trials)
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    threads_per_worker: int = 1
    address: typing.Optional[str] = None
    timeout_s: float = 1800.0


@dataclass
class SearchConfig:
    name: str = "search"
    output_dir: str = "runs"
    seed: int = 0
    model: ModelSection = field(default_factory=ModelSection)
    calibration: CalibrationSection = field(default_factory=CalibrationSection)
    fitness: FitnessSection = field(default_factory=FitnessSection)
    search: SearchSection = field(default_factory=SearchSection)
    evaluator: EvaluatorSection = field(default_factory=EvaluatorSection)
    heldout: typing.Optional[HeldoutSection] = None  # null: no held-out evaluation at the end

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Limits far above any sensible run, so that a typo fails at once instead of hanging or
# exhausting memory (a population of a billion passes every other check).
LIMITS = {"search.population": 100_000, "search.generations": 1_000_000, "search.steps_per_generation": 100_000,
          "search.max_height": 100, "search.max_size": 2000, "search.init_max_depth": 20, "search.hall_of_fame": 10_000,
          "search.top_k": 100_000, "search.tournament_size": 100_000, "search.regenerate_attempts": 1000,
          "search.elites": 100_000, "calibration.nsamples": 100_000, "calibration.seqlen": 1_000_000,
          "calibration.gradient_nsamples": 100_000, "calibration.gradient_seqlen": 1_000_000,
          "fitness.seqlen": 1_000_000, "fitness.windows": 1_000_000, "evaluator.workers": 10_000,
          "heldout.top_k": 1000, "heldout.windows": 1_000_000, "heldout.seqlen": 1_000_000,
          "seed": 2**32 - 1, "calibration.seed": 2**32 - 1}

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_run_name(name: Any, where: str = "name") -> str:
    """A run name is a plain folder name: no separators, no '.' or '..', no absolute path."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or name in (".", ".."):
        raise UserError(f"{where} must be a plain folder name (letters, digits, '.', '_', '-'; no '/'), got {name!r}")
    return name


def _check_type(value: Any, kind: Any, where: str) -> Any:
    origin = typing.get_origin(kind)
    if origin is typing.Union:
        if value is None:
            return None
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is list:
        if where.endswith(".range"):
            if (not isinstance(value, list) or len(value) != 2
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
                raise UserError(f"{where} must be [LOW, HIGH], got {_short(value)}")
            return [float(v) for v in value]
        if where.endswith(".constants"):
            if not isinstance(value, list) or not all(isinstance(v, (int, float, str)) and not isinstance(v, bool)
                                                      for v in value):
                raise UserError(f"{where} must be a list of numbers, got {value!r}")
            names = [constant_name(v) for v in value]
            bad = [v for v, n in zip(value, names) if n is None or not is_constant(n)]
            if bad:
                raise UserError(f"{where}: unknown constant(s) {', '.join(map(str, bad))}; known: {', '.join(CONSTANTS)}")
            return names
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            items = "formulas such as mul(abs(W), sqrt(X))" if where.endswith(".seed_trees") else "names"
            raise UserError(f"{where} must be a list of {items}, got {_short(value)}")
        return value
    if where.endswith(".pattern") and isinstance(value, int) and not isinstance(value, bool) and 0 < value < 3600:
        # YAML 1.1 reads an unquoted 2:4 as the base-60 integer 124: read it back, and say so
        n, m = divmod(value, 60)
        log.warning("%s: read %d as %d:%d (YAML reads an unquoted N:M as a base-60 number; write \"%d:%d\")",
                    where, value, n, m, n, m)
        return f"{n}:{m}"
    if kind in (int, float, str, bool) and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
        raise UserError(f"{where} must be {kind.__name__}, got {type(value).__name__} {_short(value)}")
    if kind is float and value != value:
        raise UserError(f"{where} must be a number, got NaN")
    limit = LIMITS.get(where)
    if limit is not None and isinstance(value, int) and value > limit:
        raise UserError(f"{where} is {value}, above the limit of {limit}")
    if where in ("seed", "calibration.seed") and isinstance(value, int) and value < 0:
        raise UserError(f"{where} must not be negative, got {value}")
    return value


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{where or 'the config'} must be a mapping of keys to values, got {_short(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        place = f"{where}.{key}" if where else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(fields)}"
            raise UserError(f"unknown key {place!r} in the config{hint}")
        kind = hints[key]
        if typing.get_origin(kind) is typing.Union and value is not None:  # Optional[section]
            inner = next(a for a in typing.get_args(kind) if a is not type(None))
            kind = inner if dataclasses.is_dataclass(inner) else kind
        if dataclasses.is_dataclass(kind):
            values[key] = _build(kind, value, place)
        else:
            values[key] = _check_type(value, kind, place)
    return cls(**values)


def _positive(value: float, where: str) -> None:
    if value <= 0:
        raise UserError(f"{where} must be positive, got {value}")


def validate(cfg: SearchConfig) -> SearchConfig:
    """Cross-field checks: impossible values are refused with the way out."""
    s, f, e, c = cfg.search, cfg.fitness, cfg.evaluator, cfg.calibration
    check_sparsity(f.sparsity, Pattern.parse(f.pattern))
    check_text(c.source, c.split, "calibration", c.data_dir)  # the test split never calibrates nor selects
    check_text(f.text, f.split, "fitness", c.data_dir)
    if f.stats_mode not in ("once", "sequential"):
        raise UserError(f"fitness.stats_mode must be 'once' or 'sequential', got {f.stats_mode!r}")
    if s.algorithm not in ("generational", "steady_state"):
        raise UserError(f"search.algorithm must be 'generational' or 'steady_state', got {s.algorithm!r}")
    if e.type not in ("inprocess", "ray", "reconstruction"):
        raise UserError(f"evaluator.type must be inprocess, ray or reconstruction, got {e.type!r}")
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
        raise UserError(f"search.patience must be a whole number of generations, at least 1, got {_short(s.patience)}; "
                        "remove it to run all search.generations")
    if not isinstance(s.min_improvement, (int, float)) or not 0 <= s.min_improvement < 1:
        raise UserError(f"search.min_improvement must be a fraction within [0, 1) (0.001 is 0.1%), got "
                        f"{_short(s.min_improvement)}")
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
    unknown = [o for o in s.operators if o not in OPERATORS]
    if unknown:
        raise UserError(f"search.operators: unknown {', '.join(unknown)}; known: {', '.join(sorted(OPERATORS))}")
    if s.space not in ("metric", "allocation"):
        raise UserError(f"search.space must be metric or allocation, got {s.space!r}")
    leaves = TERMINALS if s.space == "metric" else tuple(FEATURES)
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
        methods = ("uniform", "owl") if s.space == "metric" else ("searched",)
        if a.method not in methods:
            raise UserError(f"fitness.allocation.method must be {' or '.join(methods)} with search.space: {s.space}, "
                            f"got {a.method!r}")
        if Pattern.parse(f.pattern).structured:
            raise UserError(f"fitness.allocation needs fitness.pattern: unstructured ({f.pattern} fixes every layer)")
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
        bad = [t for t in h.texts if t not in ("wikitext2:test", "c4:validation")]
        if bad or not h.texts:
            raise UserError(f"heldout.texts must be among wikitext2:test and c4:validation, got {h.texts}")
        known = ("dense", "magnitude", "wanda", "ria", "sparsegpt", "pruner-zero")
        bad = [b for b in h.baselines if b not in known]
        if bad:
            raise UserError(f"heldout.baselines: unknown {', '.join(bad)}; known: {', '.join(known)}")
    check_run_name(cfg.name)
    return cfg


def seed_tree(spec: str, space: str) -> Tree:
    """A ``search.seed_trees`` entry as a tree: a formula, or (metric space) a known or shipped name."""
    if space == "metric" and (spec in KNOWN_METRICS or spec in shipped_trees()):
        return resolve_tree(spec)
    # a formula only, never a file: the config alone must say what generation 0 holds
    return Tree.parse(spec) if space == "allocation" else metric_only(Tree.parse(spec))


def _check_seed_trees(s: SearchSection) -> None:
    """Every seed must be a tree of this search's space, so generation 0 holds it as written."""
    if not isinstance(s.seed_trees, list):
        raise UserError(f"search.seed_trees must be a list of formulas, got {_short(s.seed_trees)}")
    if len(s.seed_trees) > s.population:
        raise UserError(f"search.seed_trees has {len(s.seed_trees)} trees, more than search.population "
                        f"({s.population}); drop some or raise the population")
    for i, spec in enumerate(s.seed_trees):
        where = f"search.seed_trees[{i}]"
        if not isinstance(spec, str):
            raise UserError(f"{where} must be a formula such as mul(abs(W), sqrt(X)), got {_short(spec)}")
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
    if "D" in metric_only(resolve_tree(s.metric)).terminals:
        raise UserError(f"search.metric {s.metric} reads D (1 / [H^-1]_jj), which exists only inside the OBS update; "
                        "an allocation search prunes its metric without it: choose a metric of W, G and X")


def config_from_dict(data: dict[str, Any]) -> SearchConfig:
    return validate(_build(SearchConfig, data, ""))


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML without aliases (an alias bomb expands a few lines into gigabytes) and without
    duplicate keys (the second would silently win)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise UserError(f"YAML aliases (*{event.anchor}) are not accepted in a config (line "
                            f"{event.start_mark.line + 1}); write the values out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise UserError(f"key {key!r} appears twice (line {key_node.start_mark.line + 1}); keep one")
            seen.add(key) if isinstance(key, (str, int, float, bool)) else None
        return super().construct_mapping(node, deep)


def load_yaml(path: str | Path, what: str = "config file") -> Any:
    """One YAML loader for every user file: safe, no aliases, no duplicate keys, one-line errors."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory; give a YAML file")
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not UTF-8 text") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        raise UserError(f"{what} {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    except RecursionError:
        raise UserError(f"{what} {path} is nested too deeply") from None


def config_mapping(data: Any, path: str | Path) -> dict[str, Any]:
    """A config file's content must be a non-empty mapping: an empty file (or ``false``) is no search."""
    if not isinstance(data, dict) or not data:
        raise UserError(f"config {path} is empty or not a mapping of keys to values (it reads as {_short(data)}); "
                        "start from configs/quick.yaml")
    return data


def load_config(path: str | Path) -> SearchConfig:
    return config_from_dict(config_mapping(load_yaml(path), path))
