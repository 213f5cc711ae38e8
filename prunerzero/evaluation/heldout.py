"""Held-out evaluation: prune with a method or tree, measure perplexity on text no search saw.

A *cell* is one pruning (method or tree, pattern, sparsity, calibration) measured on one text
(WikiText-2 test, C4 validation) on a budget of windows. Each finished cell is written at once as
its own JSON record in a folder, named by a hash of everything it depends on; a cell whose record
exists is not measured again, so a long table is built across sessions and a crash costs at most
the cell in flight. Cells that share a pruning are measured one after another on one pruned model.

Protocol (``../shared/DESIGN.md``): pruning follows the reference code (X collected block by block
on the partly pruned model, seeded calibration windows); perplexity over non-overlapping windows
of ``seqlen`` tokens, WikiText-2 test rows joined with "\\n\\n", C4 validation as the Wanda code
reads it (the first 1100 documents joined with " ").
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, fields
from itertools import groupby
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from prunerzero.choices import ALLOCATIONS, BASELINE_NAMES, HELDOUT_TEXTS, METHODS, check_allocation, choose
from prunerzero.data import joined_tokens, text_rows
from prunerzero.errors import UserError
from prunerzero.files import read_json, write_json
from prunerzero.models import load_model, prunable_linears
from prunerzero.perplexity import perplexity
from prunerzero.primitives.known import KNOWN_METRICS
from prunerzero.primitives.tree import Tree
from prunerzero.pruning.allocation import OWL_LAMBDA, OWL_M, exact_counts, load_allocation, owl_for_model
from prunerzero.pruning.calibration import Calibration, gradients_for
from prunerzero.pruning.masks import Pattern, check_sparsity
from prunerzero.pruning.obs import check_update
from prunerzero.pruning.prune import prune_model
from prunerzero.pruning.stats import collect_activation_norms

log = logging.getLogger(__name__)

C4_DOCUMENTS = 1100  # the reference code's C4 validation slice


@dataclass(frozen=True)
class Cell:
    """One measurement. ``method`` is dense, magnitude, wanda, ria, sparsegpt or tree (with ``tree``)."""

    label: str
    method: str
    tree: str | None = None
    pattern: str = "unstructured"
    sparsity: float = 0.5
    text: str = "wikitext2:test"
    windows: int | None = None  # None: the whole split
    seqlen: int = 2048  # tokens per evaluation window
    nsamples: int = 32  # calibration windows
    calib_seqlen: int = 2048
    calib_seed: int = 0
    calib_source: str = "wikitext2"
    model: str = "smollm2-135m"
    allocation: str | None = None  # None: every layer at `sparsity`; an ALLOCATIONS name or a file (exact counts)
    owl_m: float = OWL_M
    owl_lambda: float = OWL_LAMBDA
    update: str = "none"  # "obs": SparseGPT's weight update with the tree picking the masks (sparsegpt: its own)
    obs_scope: str = "block"

    def __post_init__(self) -> None:
        choose(self.method, (*METHODS, "dense"), f"cell {self.label}: method")
        if self.method == "tree":
            Tree.parse(self.tree or "")
        if self.method != "dense":
            check_sparsity(self.sparsity, Pattern.parse(self.pattern))
        check_allocation(self.allocation, Pattern.parse(self.pattern).structured, f"cell {self.label}: allocation")
        if self.method != "dense":
            check_update(self.update, self.method, Tree.parse(self.tree) if self.tree else None)
        choose(self.text, HELDOUT_TEXTS, f"cell {self.label}: text")

    def pruning(self) -> tuple:
        """What the pruned model depends on (cells equal here share one pruning)."""
        if self.method == "dense":
            return (self.model, "dense")
        return (self.model, self.method, self.tree, self.pattern, self.sparsity, self.nsamples, self.calib_seqlen,
                self.calib_seed, self.calib_source, self.allocation, self.owl_m, self.owl_lambda, self.update,
                self.obs_scope)

    def key(self) -> str:
        d = asdict(self)
        d.pop("label")
        if self.allocation is None:  # cells without an allocation keep the keys they always had
            for k in ("allocation", "owl_m", "owl_lambda"):
                d.pop(k)
        elif self.allocation not in ALLOCATIONS:  # a file: what it says, not where it lies
            d["allocation"] = "file:" + hashlib.sha256(json.dumps(
                read_json(self.allocation, "allocation file").get("layers"), sort_keys=True).encode()).hexdigest()[:16]
        if self.update == "none":  # and cells without a weight update too
            for k in ("update", "obs_scope"):
                d.pop(k)
        if self.method == "dense":
            for k in ("tree", "pattern", "sparsity", "nsamples", "calib_seqlen", "calib_seed", "calib_source"):
                d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def known_cell(name: str, **kw: Any) -> Cell:
    """A cell for a baseline by name: a method (magnitude, wanda, ria, sparsegpt), a known tree
    (pruner-zero), or dense."""
    choose(name, BASELINE_NAMES, "baseline")
    if name == "dense" or name in METHODS:
        return Cell(label=name, method=name, **kw)
    return Cell(label=name, method="tree", tree=KNOWN_METRICS[name].formula, **kw)


def evaluation_tokens(tokenizer: object, text: str, data_dir: str | None, max_tokens: int | None) -> torch.Tensor:
    source, split = text.split(":")
    if source == "c4":
        rows = text_rows("c4", split, data_dir)[:C4_DOCUMENTS]
        ids = tokenizer(" ".join(rows), return_tensors="pt").input_ids[0]
        return ids if max_tokens is None else ids[:max_tokens]
    return joined_tokens(tokenizer, source, split, "\n\n", data_dir, max_tokens)


@dataclass
class CellRunner:
    """Measures cells into ``folder`` (one JSON file per cell), skipping those already there."""

    folder: Path
    data_dir: str | None = None
    device: str = "cpu"
    gradient_cache: str | None = None
    _loaded: dict[str, Any] = field(default_factory=dict)

    def record_path(self, cell: Cell) -> Path:
        return Path(self.folder) / f"{cell.key()}.json"

    def done(self, cell: Cell) -> dict[str, Any] | None:
        """The cell's record, if one was written and holds what a record of this cell must; a record that
        does not (edited, truncated, another cell's) is measured again, with one warning line."""
        path = self.record_path(cell)
        if not path.is_file():
            return None
        try:
            record = read_json(path, "cell record")
            problem = record_problem(record, cell)
        except UserError as e:
            problem = str(e)
        if problem:
            log.warning("held-out record %s is not a record of cell %s (%s); measuring the cell again",
                        path, cell.label, problem)
            return None
        return record

    def run(self, cells: Sequence[Cell]) -> list[dict[str, Any]]:
        todo = [c for c in cells if self.done(c) is None]
        log.info("held-out cells: %d of %d already measured, %d to go", len(cells) - len(todo), len(cells), len(todo))
        start, finished = time.perf_counter(), 0
        for _, group in groupby(sorted(todo, key=lambda c: repr(c.pruning())), key=lambda c: c.pruning()):
            group = list(group)
            model, tokenizer, seconds = self._pruned(group[0])
            for cell in group:
                self._measure(cell, model, tokenizer, seconds)
                finished += 1
                rate = (time.perf_counter() - start) / finished
                log.info("cell %d/%d done (%s, %s, %s): %.0f s per cell, about %.0f s to go", finished, len(todo),
                         cell.label, cell.pattern, cell.text, rate, rate * (len(todo) - finished))
        return [self.done(c) for c in cells]

    def _model(self, name: str) -> tuple[Any, Any, Any]:
        if self._loaded.get("name") != name:
            model, tokenizer, source = load_model(name, self.device)
            dense = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self._loaded = {"name": name, "model": (model, tokenizer, source), "dense": dense}
        model, tokenizer, source = self._loaded["model"]
        model.load_state_dict(self._loaded["dense"])  # every pruning starts from the dense weights
        return model, tokenizer, source

    def _pruned(self, cell: Cell) -> tuple[Any, Any, float]:
        model, tokenizer, source = self._model(cell.model)
        if cell.method == "dense":
            return model, tokenizer, 0.0
        tree = Tree.parse(cell.tree) if cell.tree else None
        calib = Calibration(cell.calib_source, None, cell.nsamples, cell.calib_seqlen, cell.calib_seed, self.data_dir)
        windows = calib.windows(tokenizer)
        gradients = None
        if tree is not None and "G" in tree.terminals:
            gradients = gradients_for(model, source, windows, calib, self.gradient_cache)
        allocation = None
        if cell.allocation is not None:
            names = list(prunable_linears(model))
            sizes = {n: m.weight.numel() for n, m in prunable_linears(model).items()}
            if cell.allocation == "owl":
                allocation, _ = owl_for_model(model, collect_activation_norms(model, windows), cell.sparsity,
                                              cell.owl_m, cell.owl_lambda)
            elif cell.allocation == "uniform":
                allocation = exact_counts({n: cell.sparsity for n in names}, sizes, cell.sparsity, 0.0, 1.0, "uniform")
            else:
                allocation = load_allocation(cell.allocation, sizes, cell.sparsity)
        report = prune_model(model, cell.method, cell.sparsity, Pattern.parse(cell.pattern), windows=windows,
                             tree=tree, gradients=gradients, allocation=allocation, update=cell.update,
                             obs_scope=cell.obs_scope)
        self._sparsity = report.sparsity_actual
        return model, tokenizer, report.seconds

    def _measure(self, cell: Cell, model: Any, tokenizer: Any, prune_seconds: float) -> None:
        max_tokens = None if cell.windows is None else cell.windows * cell.seqlen
        tokens = evaluation_tokens(tokenizer, cell.text, self.data_dir, max_tokens)
        ppl, n = perplexity(model, tokens, cell.seqlen, cell.windows)
        record = {**asdict(cell), "key": cell.key(), "ppl": ppl if math.isfinite(ppl) else None,
                  "eval_tokens": n, "eval_windows": n // cell.seqlen, "prune_seconds": round(prune_seconds, 1),
                  "sparsity_actual": None if cell.method == "dense" else self._sparsity,
                  "device": self.device, "torch": torch.__version__, "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
        if not math.isfinite(ppl):
            record["note"] = f"perplexity was {ppl}"
        write_json(self.record_path(cell), record)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def record_problem(record: Any, cell: Cell) -> str | None:
    """Why ``record`` cannot stand for ``cell`` (None if it can): a JSON object whose key is the cell's
    key (the file name), whose fields are the cell's, with a finite positive perplexity (or null with a
    note) and whole token counts."""
    if not isinstance(record, dict):
        return f"a {type(record).__name__}, not a JSON object"
    if record.get("key") != cell.key():
        return f"its key {_short_repr(record.get('key'))} is not the cell's {cell.key()}"
    defaults = {f.name: f.default for f in fields(Cell)}
    for name, value in asdict(cell).items():
        if name in ("label", "allocation"):  # a label is a name; an allocation file is in the key by content
            continue
        if name not in record and value == defaults[name]:  # written before the field existed
            continue
        if name not in record or record[name] != value:
            return f"its {name} is {_short_repr(record.get(name))}, the cell's is {value!r}"
    ppl = record.get("ppl")
    if ppl is None and "note" not in record:
        return "no perplexity"
    if ppl is not None and not (_number(ppl) and ppl > 0):
        return f"perplexity {_short_repr(ppl)} is not a positive number"
    for name in ("eval_tokens", "eval_windows"):
        v = record.get(name)
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            return f"its {name} {_short_repr(v)} is not a count"
    if not isinstance(record.get("label"), str):
        return "no label"
    return None


def _short_repr(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:40] + "..."


def cells_for(labels_and_trees: Iterable[tuple[str, str]], baselines: Sequence[str], patterns: Sequence[str],
              sparsities: Sequence[float], texts: Sequence[str], tree_settings: dict[str, Any] | None = None,
              **common: Any) -> list[Cell]:
    """The grid: every baseline and every (label, formula) tree at every pattern / sparsity and text.
    ``tree_settings``: what the trees' cells add (the weight update they were found with)."""
    cells = []
    for pattern, sparsity in zip(patterns, sparsities):
        for text in texts:
            for name in baselines:
                cells.append(known_cell(name, pattern=pattern, sparsity=sparsity, text=text, **common))
            for label, formula in labels_and_trees:
                cells.append(Cell(label=label, method="tree", tree=formula, pattern=pattern, sparsity=sparsity,
                                  text=text, **(tree_settings or {}), **common))
    return cells


def summary(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Records as a table: one row per pruning label and pattern, one column per text."""
    rows: dict[tuple, dict[str, Any]] = {}
    for r in records:
        if r is None:
            continue
        row = rows.setdefault((r["label"], r["pattern"], r["sparsity"]), {
            "label": r["label"], "method": r["method"], "tree": r["tree"], "pattern": r["pattern"],
            "sparsity": r["sparsity"]})
        row[r["text"]] = r["ppl"]
        row[f"{r['text']} windows"] = r["eval_windows"]
    return {"rows": list(rows.values())}


def format_table(table: dict[str, Any], texts: Sequence[str] = HELDOUT_TEXTS) -> str:
    head = "| metric | pattern | " + " | ".join(texts) + " |"
    lines = [head, "|---|---|" + "---:|" * len(texts)]
    for row in table["rows"]:
        name = row["label"] if row["method"] != "tree" or row["label"] in KNOWN_METRICS else f"{row['label']} `{row['tree']}`"
        cells = ["-" if row.get(t) is None else f"{row[t]:.3f}" for t in texts]
        lines.append(f"| {name} | {row['pattern'] if row['method'] != 'dense' else '-'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
