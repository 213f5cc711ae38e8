"""What a search is at the end of a generation: its population, every fitness measured, its log.

A checkpoint holds exactly this (besides the config); :mod:`prunerzero.search.engine` advances it,
:mod:`prunerzero.search.checkpoint` writes it as JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from prunerzero.errors import UserError
from prunerzero.fitness.base import WORST_FITNESS
from prunerzero.primitives.tree import Tree


@dataclass
class SearchState:
    """The whole state of a search; what a checkpoint holds (besides the config)."""

    generation: int = -1  # last completed generation; -1 before the initial population
    population: list[str] = field(default_factory=list)  # formulas
    cache: dict[str, dict[str, Any]] = field(default_factory=dict)  # canonical key -> record
    log: list[dict[str, Any]] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)  # in-flight steady state: children bred, not yet placed
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("generated", "simplified", "regenerated", "formula_cache_hits", "mask_cache_hits", "evaluated", "degenerate",
         "promoted", "stopped_low", "mask_twins"), 0))

    def to_json(self) -> dict[str, Any]:
        d = {"generation": self.generation, "population": self.population, "cache": self.cache,
             "log": self.log, "counters": self.counters}
        if self.pending:
            d["pending"] = self.pending
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "SearchState":
        """A state from its JSON form, every field type-checked (a bad file gets one line)."""
        for key, kind in (("generation", int), ("population", list), ("cache", dict), ("log", list),
                          ("counters", dict)):
            if key not in d:
                raise UserError(f"missing key {key!r}")
            if not isinstance(d[key], kind) or isinstance(d[key], bool):
                raise UserError(f"{key!r} must be {kind.__name__}, got {type(d[key]).__name__}")
        if d["generation"] < -1:
            raise UserError(f"'generation' must be -1 or more, got {d['generation']}")
        if not all(isinstance(f, str) for f in d["population"]):
            raise UserError("'population' must be a list of formulas")
        if d["generation"] >= 0 and not d["population"]:
            raise UserError(f"'population' is empty after generation {d['generation']}")
        pending = d.get("pending", [])
        if not isinstance(pending, list) or not all(isinstance(f, str) for f in pending):
            raise UserError("'pending' must be a list of formulas")
        for f in d["population"] + pending:
            Tree.parse(f)
        for key, r in d["cache"].items():
            if (not isinstance(r, dict) or not isinstance(r.get("tree"), str)
                    or not isinstance(r.get("fitness"), (int, float)) or isinstance(r.get("fitness"), bool)
                    or not isinstance(r.get("generation"), int)):
                raise UserError(f"cache entry {key[:60]!r} must hold 'tree' (text), 'fitness' (number), 'generation'")
            if not 0 <= r["fitness"] <= WORST_FITNESS:
                raise UserError(f"cache entry {key[:60]!r} has fitness {r['fitness']} outside [0, {WORST_FITNESS:g}]")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in d["counters"].values()):
            raise UserError("'counters' must map names to integers")
        if not all(isinstance(r, dict) for r in d["log"]):
            raise UserError("'log' must be a list of objects")
        state = cls()
        state.generation = d["generation"]
        state.population = list(d["population"])
        state.pending = list(pending)
        state.cache = dict(d["cache"])
        state.log = list(d["log"])
        state.counters.update(d["counters"])
        return state

    def fitness_of(self, formula: str) -> float:
        """The fitness of a population member (a tree as it was evaluated, after OOS)."""
        index = {r["tree"]: r for r in self.cache.values()}
        record = index.get(formula) or self.cache.get(Tree.parse(formula).symbolic_key())
        if record is None:
            raise KeyError(formula)
        return record["fitness"]

    def hall_of_fame(self, k: int) -> list[dict[str, Any]]:
        """The best k distinct metrics ever evaluated (ties: smaller tree, then formula)."""
        # estimated (multi-fidelity, not promoted) fitnesses were never measured on the full budget
        good = [r for r in self.cache.values() if r["fitness"] < WORST_FITNESS and not r.get("estimated")]
        good.sort(key=lambda r: (r["fitness"], len(Tree.parse(r["tree"])), r["tree"]))
        out, masks = [], set()
        for r in good:  # metrics that prune alike are one metric: keep the smallest formula
            if r.get("mask_key") in masks:
                continue
            masks.add(r.get("mask_key")) if r.get("mask_key") else None
            out.append(r)
            if len(out) == k:
                break
        return out


    def pareto_front(self) -> list[dict[str, Any]]:
        """Metrics no other beats on both fitness and size (as PySR keeps), smallest first: a user
        can pick a short metric that is nearly as good as the best."""
        front: list[dict[str, Any]] = []
        for r in self.hall_of_fame(len(self.cache)):  # best first; equal masks already merged
            size = len(Tree.parse(r["tree"]))
            if all(size < len(Tree.parse(f["tree"])) for f in front):
                front.append(r)
        return sorted(front, key=lambda r: len(Tree.parse(r["tree"])))


def stalled(log: Sequence[Mapping[str, Any]], patience: int | None, min_improvement: float = 0.0) -> bool:
    """Whether the best fitness of the last ``patience`` generations gained no more than
    ``min_improvement`` (relative) on the best before them (``search.patience``). Read from the
    run's log alone, so a resumed run stops where an uninterrupted one would."""
    if patience is None or len(log) <= patience:
        return False
    now, then = log[-1].get("best"), log[-1 - patience].get("best")
    if now is None or then is None:
        return False
    return now >= then - min_improvement * abs(then)
