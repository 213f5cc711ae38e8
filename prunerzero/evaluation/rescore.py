"""Validation re-score: a search's best metrics and the known ones, measured again on validation
windows the search never used, before one of them is shipped.

A search picks its best on a small fitness text, so its top ranks are partly chosen by that text's
noise (``docs/decisions.md``: a 2:4 metric 3.1% better than Wanda on 8 x 512 fitness tokens lost by
5.66% on the test split). The re-score measures the top ``top`` trees of the hall of fame and the
baselines on other windows of the same validation text: longer ones (2048 tokens, as the test is
measured), none sharing a token with the run's fitness windows or with any calibration window,
and by default with X collected block by block on the partly pruned model, as the final pruning
does. The test split is not touched: it stays for the final table.

One JSON file per re-score setting in ``RUN/rescore/``, rewritten after every tree (atomically):
a stopped re-score resumes where it was and measures nothing twice.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import shlex
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from prunerzero.choices import COMPARED, STATS_MODES, choose
from prunerzero.data import unused_tokens
from prunerzero.errors import UserError
from prunerzero.files import read_json, write_json
from prunerzero.fitness.model_fitness import ModelFitness
from prunerzero.primitives.known import resolve_tree
from prunerzero.primitives.tree import Tree
from prunerzero.runfolder import best_trees, fitness_settings, run_state

log = logging.getLogger(__name__)

RESCORE_DIR = "rescore"


@dataclass(frozen=True)
class RescoreSettings:
    """What a re-score measures: the top ``top`` trees and ``baselines`` on ``windows`` x ``seqlen``
    unused validation tokens, pruned with statistics ``stats_mode`` from a calibration of ``nsamples`` x
    ``calib_seqlen`` windows (None: the run's)."""

    top: int = 10
    windows: int = 8
    seqlen: int = 2048
    stats_mode: str = "sequential"
    nsamples: int | None = None
    calib_seqlen: int | None = None
    baselines: tuple[str, ...] = COMPARED

    def __post_init__(self) -> None:
        if self.top < 1:
            raise UserError(f"--top must be at least 1, got {self.top}")
        if self.windows < 1:
            raise UserError(f"--windows must be at least 1, got {self.windows}")
        if self.seqlen < 2:
            raise UserError(f"--seqlen must be at least 2, got {self.seqlen}")
        choose(self.stats_mode, STATS_MODES, "--stats")
        for value, flag in ((self.nsamples, "--nsamples"), (self.calib_seqlen, "--calib-seqlen")):
            if value is not None and value < 1:
                raise UserError(f"{flag} must be at least 1, got {value}")
        for name in self.baselines:
            resolve_tree(name)  # a clear error for an unknown name, before anything loads

    def command(self, run: str) -> str:
        """The command line that makes this re-score of ``runs/RUN``."""
        extra = "".join(f" {flag} {value}" for flag, value in (("--nsamples", self.nsamples),
                                                                ("--calib-seqlen", self.calib_seqlen)) if value)
        return (f"prunerzero rescore runs/{run} --top {self.top} --windows {self.windows} --seqlen {self.seqlen} "
                f"--stats {self.stats_mode}{extra} --baselines {shlex.quote(','.join(self.baselines))}")

    def key(self) -> str:
        """The record's name: everything a measured perplexity depends on besides the tree."""
        d = asdict(self)
        d.pop("top"), d.pop("baselines")  # more trees or baselines extend the same record
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _measured_twin(record: dict[str, Any], formula: str) -> dict[str, Any] | None:
    """An entry of the record already measured for the same function as ``formula``, in either group:
    ``mul(W, sqrt(X))`` among the top trees is Wanda's ``mul(abs(W), sqrt(X))`` (W > 0 in the keys)."""
    key = _symbolic_key(formula)
    for entries in (record["trees"], record["baselines"]):
        for other, entry in entries.items():
            if other == formula or _symbolic_key(other) == key:
                return entry
    return None


@functools.lru_cache(maxsize=256)  # SymPy simplification: once per formula, not once per comparison
def _symbolic_key(formula: str) -> str:
    return Tree.parse(formula).symbolic_key()


def rescore_path(run_dir: Path, settings: RescoreSettings) -> Path:
    return Path(run_dir) / RESCORE_DIR / f"{settings.key()}.json"


def rescore_run(run_dir: Path, cfg: Any, settings: RescoreSettings) -> dict[str, Any]:
    """Measure (or finish measuring) the re-score of a metric search; returns the record."""
    run_dir = Path(run_dir)
    if cfg.search.space == "allocation":
        raise UserError(f"{run_dir} searched allocation functions, not metrics; there is nothing to re-score")
    if cfg.evaluator.type == "reconstruction":
        raise UserError(f"{run_dir} used the reconstruction fitness (no model, no text); re-score needs a model run")
    if cfg.fitness.settings is not None:  # a re-score measures one setting: which one would be a guess
        raise UserError(f"{run_dir} scored {len(cfg.fitness.settings)} settings together; re-score measures one "
                        "setting and does not take a multi-setting run yet: measure its trees with "
                        "`prunerzero prune --tree FORMULA` (test) or benchmarks/fitness_of.py (its own validation text)")
    state, _ = run_state(run_dir)
    top = best_trees(state, settings.top)
    if not top:
        raise UserError(f"{run_dir} has no evaluated metric yet")
    run_fit = fitness_settings(cfg)
    calib = replace(run_fit.calibration, nsamples=settings.nsamples or run_fit.calibration.nsamples,
                    seqlen=settings.calib_seqlen or run_fit.calibration.seqlen)
    # Another calibration (--nsamples, --calib-seqlen) gives X and G both, as `prunerzero prune` takes
    # them; without one, the statistics are the search's own (G from its gradient windows if apart).
    recalibrated = settings.nsamples is not None or settings.calib_seqlen is not None
    fit_settings = replace(run_fit, calibration=calib, seqlen=settings.seqlen, windows=settings.windows,
                           stats_mode=settings.stats_mode,
                           gradient_calibration=None if recalibrated else run_fit.gradient_calibration)
    path = rescore_path(run_dir, settings)
    record = _load(path) or {
        "run": cfg.name, "what": "perplexity on validation windows the search never used (lower is better)",
        "text": f"{run_fit.text}:{run_fit.split}", "windows": settings.windows, "seqlen": settings.seqlen,
        "stats_mode": settings.stats_mode, "calibration": calib.key(), "pattern": run_fit.pattern,
        "sparsity": run_fit.sparsity,
        "avoids": {"fitness": {"windows": run_fit.windows, "seqlen": run_fit.seqlen},
                   "calibrations": [c.key() for c in [*run_fit.calibrations(), calib]]},
        "command": settings.command(cfg.name), "trees": {}, "baselines": {}}
    if rerank(record, best_trees(state, max(len(state.cache), settings.top))):
        write_json(path, record)
    # baselines first: a re-score stopped early still compares what it measured with them
    wanted = [(str(resolve_tree(name)), "baselines", {"name": name}) for name in settings.baselines]
    wanted += [(r["formula"], "trees", {"rank": r["rank"], "fitness": r["fitness"], "generation": r["generation"]})
               for r in top]
    todo = [w for w in wanted if w[0] not in record[w[1]]]
    log.info("re-score of %s: %d trees and %d baselines, %d already measured; %d x %d unused %s tokens, %s statistics",
             run_dir, len(top), len(settings.baselines), len(wanted) - len(todo), settings.windows, settings.seqlen,
             record["text"], settings.stats_mode)
    if todo:
        uses_g = any("G" in Tree.parse(formula).terminals for formula, _, _ in todo)
        # sequential statistics re-collect X per tree: the dense model's X is not needed
        fitness = ModelFitness(fit_settings, run_dir, gradients=uses_g, activations=settings.stats_mode == "once")
        # the windows measured are not the settings' own fitness windows (the search's) but unused ones
        fitness.tokens = unused_tokens(
            fitness.tokenizer, run_fit.text, run_fit.split, settings.seqlen, settings.windows,
            (run_fit.seqlen, run_fit.windows),
            [c.draw() for c in [*run_fit.calibrations(), calib]], calib.data_dir, len(run_fit.calibrations()))
        for i, (formula, group, info) in enumerate(todo, 1):
            start = time.perf_counter()
            twin = _measured_twin(record, formula)
            if twin is not None:  # the same function (a baseline among the top trees, another spelling): once
                entry = {**info, **{k: twin[k] for k in ("perplexity", "seconds", "reason", "window_losses")
                                    if k in twin}}
            else:
                result = fitness.evaluate(Tree.parse(formula))
                entry = {**info, "perplexity": result.fitness if result.reason is None else None,
                         "seconds": round(time.perf_counter() - start, 1)}
                if result.reason is not None:
                    entry["reason"] = result.reason
                elif result.window_losses is not None:  # for the paired comparison (format_rescore)
                    entry["window_losses"] = list(result.window_losses)
            record[group][formula] = entry
            record["command"] = _command_for(record, settings, cfg.name)
            write_json(path, record)
            log.info("[%d/%d] %s %s: %s (%.0f s)", i, len(todo), group[:-1], info.get("name") or f"#{info['rank']}",
                     "cannot rank" if entry["perplexity"] is None else f"{entry['perplexity']:.3f}", entry["seconds"])
    return record


def rerank(record: dict[str, Any], ranked: list[dict[str, Any]]) -> bool:
    """Give the recorded trees their current rank and fitness in the run (a resumed search ranks its
    trees anew: the record's ranks would else be those of the call that measured each). A tree no
    longer ranked at all keeps its old entry, marked. True when anything changed."""
    now = {r["formula"]: r for r in ranked}
    changed = False
    for formula, entry in record["trees"].items():
        current = now.get(formula)
        update = ({"rank": current["rank"], "fitness": current["fitness"]} if current is not None
                  else {"unranked": True})
        if current is not None and entry.pop("unranked", None) is not None:
            changed = True  # ranked again after a later resume
        if any(entry.get(k) != v for k, v in update.items()):
            entry.update(update)
            changed = True
    return changed


def _command_for(record: dict[str, Any], settings: RescoreSettings, run: str) -> str:
    """The one command that measures everything the record holds (a record grows by later calls
    with more trees or baselines)."""
    top = max([settings.top] + [t["rank"] for t in record["trees"].values()])
    names = tuple(dict.fromkeys(b["name"] for b in record["baselines"].values()))
    return replace(settings, top=top, baselines=names).command(run)


def _load(path: Path) -> dict[str, Any] | None:
    return read_json(path, "re-score record") if path.is_file() else None


def paired_change(losses: Sequence[float], reference: Sequence[float]) -> tuple[float, float] | None:
    """The perplexity change against a reference measured on the same windows, and its standard
    error from the spread of the per-window differences: (change, error) as fractions, or None
    without two windows in common. Perplexity is exp(mean loss), so the change is exactly
    exp(mean(d)) - 1 over the per-window loss differences d; the error is the delta method's. It
    says how far the windows alone could move a gap (not how far another calibration could)."""
    if len(losses) != len(reference) or len(losses) < 2:
        return None
    d = np.asarray(losses, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    ratio = float(np.exp(d.mean()))
    return ratio - 1.0, ratio * float(d.std(ddof=1)) / math.sqrt(len(d))


def _paired_cell(entry: dict[str, Any], reference: dict[str, Any] | None) -> str:
    got = None if reference is None else paired_change(entry.get("window_losses") or (),
                                                       reference.get("window_losses") or ())
    return f"{'-':>20}" if got is None else f"{100 * got[0]:+.2f}±{100 * got[1]:.2f}%".rjust(20)


def format_rescore(record: dict[str, Any]) -> str:
    """The re-score as a table: each tree's search fitness and re-scored perplexity, the change
    against each baseline's re-scored perplexity, and against the first baseline window by window
    (paired: the change with its standard error over the windows, when the record has the
    per-window losses)."""
    base = {v["name"]: v["perplexity"] for v in record["baselines"].values() if v["perplexity"] is not None}
    first = next(iter(record["baselines"].values()), None)
    paired_head = f"{'paired vs ' + first['name']:>20}  " if first is not None else ""
    lines = [f"re-score of {record['run']}: {record['windows']} x {record['seqlen']} unused {record['text']} tokens, "
             f"{record['stats_mode']} statistics, calibration {record['calibration']['nsamples']} x "
             f"{record['calibration']['seqlen']}",
             f"{'rank':>4}  {'fitness':>9}  {'re-score':>9}  " + "  ".join(f"{'vs ' + n:>14}" for n in base)
             + f"  {paired_head}formula"]
    paired = (lambda entry: _paired_cell(entry, first) + "  ") if first is not None else (lambda entry: "")
    for b in record["baselines"].values():
        if b["perplexity"] is not None:
            lines.append(f"{'':>4}  {'':>9}  {b['perplexity']:>9.3f}  " + "  ".join(f"{'':>14}" for _ in base)
                         + f"  {paired(b) if b is not first else ' ' * 22}{b['name']}")
    for formula, r in sorted(record["trees"].items(), key=lambda kv: kv[1]["rank"]):
        ppl = r["perplexity"]
        if ppl is None:
            lines.append(f"{r['rank']:>4}  {r['fitness']:>9.3f}  {'-':>9}  {r.get('reason', '')}  {formula}")
            continue
        gaps = "  ".join(f"{100 * (ppl / b - 1):>+13.2f}%" for b in base.values())
        lines.append(f"{r['rank']:>4}  {r['fitness']:>9.3f}  {ppl:>9.3f}  {gaps}  {paired(r)}{formula}")
    return "\n".join(lines)


def best_rescored(record: dict[str, Any], skip: set[str] = frozenset()) -> tuple[str, dict[str, Any]] | None:
    """The tree with the lowest re-scored perplexity, or None if none was measured; trees whose
    symbolic key is in ``skip`` (the known metrics, when shipping a bred one) are passed over."""
    measured = [(f, r) for f, r in record["trees"].items()
                if r["perplexity"] is not None and Tree.parse(f).symbolic_key() not in skip]
    return min(measured, key=lambda fr: fr[1]["perplexity"]) if measured else None
