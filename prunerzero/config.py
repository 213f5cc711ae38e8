"""The search configuration: YAML in, validated dataclasses out.

Validation happens here, at the edge: unknown keys (with a "did you mean"), wrong types and
impossible values are named with their place in the file (``search.population``).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunerzero.choices import (
    BASELINES,
    HELDOUT_TEXTS,
)
from prunerzero.config_rules import validate
from prunerzero.errors import UserError, short_repr
from prunerzero.files import load_yaml
from prunerzero.primitives.registry import (
    CONSTANTS,
    DEFAULT_OPERATORS,
    TERMINALS,
    constant_name,
    is_constant,
)

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
    # "obs": each candidate picks the masks inside SparseGPT's weight update (the terminal D exists there)
    update: str = "none"
    obs_scope: str = "block"  # where the rule's scores are ranked inside the update: the block, or each row
    # Several settings scored at once: [{sparsity, pattern, allocation}, ...]; the fitness is then the
    # geometric mean of the perplexity ratios to `reference` in each (null: the one setting above).
    settings: typing.Optional[list] = None
    reference: str = "wanda"


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
    baselines: list = field(default_factory=lambda: list(BASELINES))
    texts: list = field(default_factory=lambda: list(HELDOUT_TEXTS))
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

def _check_type(value: Any, kind: Any, where: str) -> Any:
    origin = typing.get_origin(kind)
    if origin is typing.Union:
        if value is None:
            return None
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is list:
        if where == "fitness.settings":
            return _settings_entries(value, where)
        if where.endswith(".range"):
            if (not isinstance(value, list) or len(value) != 2
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
                raise UserError(f"{where} must be [LOW, HIGH], got {short_repr(value)}")
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
            raise UserError(f"{where} must be a list of {items}, got {short_repr(value)}")
        return value
    if where.endswith(".pattern") and isinstance(value, int) and not isinstance(value, bool) and 0 < value < 3600:
        # YAML 1.1 reads an unquoted 2:4 as the base-60 integer 124: read it back, and say so
        n, m = divmod(value, 60)
        log.warning("%s: read %d as %d:%d (YAML reads an unquoted N:M as a base-60 number; write \"%d:%d\")",
                    where, value, n, m, n, m)
        return f"{n}:{m}"
    if kind in (int, float, str, bool) and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
        raise UserError(f"{where} must be {kind.__name__}, got {type(value).__name__} {short_repr(value)}")
    if kind is float and value != value:
        raise UserError(f"{where} must be a number, got NaN")
    limit = LIMITS.get(where)
    if limit is not None and isinstance(value, int) and value > limit:
        raise UserError(f"{where} is {value}, above the limit of {limit}")
    if where in ("seed", "calibration.seed") and isinstance(value, int) and value < 0:
        raise UserError(f"{where} must not be negative, got {value}")
    return value


SETTING_KEYS = ("sparsity", "pattern", "allocation")


def _settings_entries(value: Any, where: str) -> list[dict[str, Any]]:
    """``fitness.settings``: a non-empty list of mappings with keys among sparsity, pattern, allocation."""
    if not isinstance(value, list) or not value:
        raise UserError(f"{where} must be a non-empty list of {{sparsity, pattern, allocation}} mappings, got "
                        f"{short_repr(value)}; remove the key to score one setting")
    out = []
    for i, entry in enumerate(value):
        if not isinstance(entry, dict) or not entry:
            raise UserError(f"{where}[{i}] must be a mapping such as {{sparsity: 0.7, allocation: owl}}, got "
                            f"{short_repr(entry)}")
        for key in entry:
            if key not in SETTING_KEYS:
                close = difflib.get_close_matches(str(key), SETTING_KEYS, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(SETTING_KEYS)}"
                raise UserError(f"unknown key {where}[{i}].{key}{hint}")
        entry = dict(entry)
        if "sparsity" in entry:
            entry["sparsity"] = _check_type(entry["sparsity"], float, f"{where}[{i}].sparsity")
        if "pattern" in entry:
            entry["pattern"] = _check_type(entry["pattern"], str, f"{where}[{i}].pattern")
        if entry.get("allocation") is not None:
            entry["allocation"] = _check_type(entry["allocation"], str, f"{where}[{i}].allocation")
        out.append(entry)
    return out


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{where or 'the config'} must be a mapping of keys to values, got {short_repr(data)}")
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


def config_from_dict(data: dict[str, Any]) -> SearchConfig:
    return validate(_build(SearchConfig, data, ""))


def config_mapping(data: Any, path: str | Path) -> dict[str, Any]:
    """A config file's content must be a non-empty mapping: an empty file (or ``false``) is no search."""
    if not isinstance(data, dict) or not data:
        raise UserError(f"config {path} is empty or not a mapping of keys to values (it reads as {short_repr(data)}); "
                        "start from configs/quick.yaml")
    return data


def load_config(path: str | Path) -> SearchConfig:
    return config_from_dict(config_mapping(load_yaml(path), path))
