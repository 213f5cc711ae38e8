"""The sparsity sweep of ``prunerzero report --sweep``: a run's top metrics against the baselines
at several unstructured sparsities and N:M patterns, on WikiText-2 test (loads the run's model).

:func:`sparsity_sweep` is the model-level part and takes pre-tokenized text, so it can be called
on any in-memory model.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from prunerzero.choices import METHODS, SWEEP_BASELINES, choose
from prunerzero.data import eval_tokens
from prunerzero.errors import UserError
from prunerzero.models import load_model, pick_device
from prunerzero.perplexity import perplexity, window_count
from prunerzero.primitives.known import KNOWN_METRICS
from prunerzero.primitives.tree import Tree
from prunerzero.pruning.calibration import Calibration, gradients_for
from prunerzero.pruning.masks import Pattern, check_sparsity
from prunerzero.pruning.prune import prune_model

log = logging.getLogger(__name__)

SWEEP_JSON = "sweep.json"
SWEEP_PLOT = "sweep.png"
DEFAULT_SPARSITIES = (0.3, 0.4, 0.5, 0.6, 0.7)
DEFAULT_PATTERNS = ("2:4", "4:8")


def _restore(model: Any, dense: Mapping[str, Any]) -> None:
    model.load_state_dict(dense, strict=True)  # copy_ into every tensor: bitwise exact


def sweep_cells(sparsities: Sequence[float], patterns: Sequence[str]) -> list[tuple[str, float]]:
    """(pattern, sparsity) of every cell: each unstructured sparsity, then each N:M pattern at N/M."""
    cells = [("unstructured", check_sparsity(s, Pattern())) for s in sparsities]
    for text in patterns:
        p = Pattern.parse(text)
        if not p.structured:
            raise UserError(f"--patterns takes N:M patterns such as 2:4, not {text!r}; unstructured sparsities go in --sweep-sparsities")
        cells.append((str(p), p.n / p.m))
    if not cells:
        raise UserError("the sweep has no cell: give at least one sparsity or one N:M pattern")
    return cells


def sparsity_sweep(
    model: Any,
    tokens: Any,
    trees: Sequence[Any],
    *,
    windows: Any = None,
    gradients: Mapping[str, Any] | None = None,
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    patterns: Sequence[str] = DEFAULT_PATTERNS,
    eval_seqlen: int = 1024,
    eval_windows: int | None = 4,
    baselines: Sequence[str] = SWEEP_BASELINES,
    on_cell: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Perplexity of ``model`` pruned by each method at each sparsity and N:M pattern.

    ``tokens``: the evaluation text as a 1-D tensor of token ids (its first ``eval_windows``
    windows of ``eval_seqlen`` tokens are scored). ``trees``: metrics, each a
    :class:`~prunerzero.primitives.tree.Tree` or a ``(label, Tree)`` pair. ``windows``: the
    calibration windows (n, seqlen), needed by wanda, sparsegpt and trees using X; ``gradients``:
    G per layer, needed by trees using G. Every cell starts from the dense weights: a copy of the
    state dict is kept (on the CPU) and loaded back after each cell, so the model is dense again
    when this returns. ``on_cell(row)`` is called after each cell, once the weights are restored.
    """
    import torch

    methods: list[tuple[str, str, Tree | None]] = []
    for b in baselines:
        choose(b, [m for m in METHODS if m != "tree"], "sweep baseline")
        methods.append((b, b, None))
    for t in trees:
        label, tree = t if isinstance(t, tuple) else (str(t), t)
        methods.append((label, "tree", tree))
    if not methods:
        raise UserError("the sweep has no method: give a tree or a baseline")
    cells = sweep_cells(sparsities, patterns)
    needs_windows = [label for label, m, tree in methods if m in ("wanda", "sparsegpt") or (tree is not None and "X" in tree.terminals)]
    if needs_windows and windows is None:
        raise UserError(f"{needs_windows[0]} needs calibration windows")
    needs_g = [label for label, _, tree in methods if tree is not None and "G" in tree.terminals]
    if needs_g and gradients is None:
        raise UserError(f"{needs_g[0]} uses G: gradients are needed")
    n_windows = window_count(int(tokens.numel()), eval_seqlen, eval_windows)
    if n_windows < 1:
        raise UserError(f"the evaluation text has {tokens.numel()} tokens, fewer than one window of {eval_seqlen}")

    dense = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    start_all = time.perf_counter()
    dense_ppl, n_tokens = perplexity(model, tokens, eval_seqlen, eval_windows, progress=False)
    log.info("sweep: dense perplexity %.4f (%d windows of %d tokens); %d methods x %d cells",
             dense_ppl, n_windows, eval_seqlen, len(methods), len(cells))
    rows: list[dict[str, Any]] = []
    total = len(methods) * len(cells)
    for label, method, tree in methods:
        for pattern_text, sparsity in cells:
            start = time.perf_counter()
            try:
                with torch.no_grad():
                    report = prune_model(model, method, sparsity, Pattern.parse(pattern_text), windows=windows,
                                         tree=tree, gradients=gradients)
                ppl, _ = perplexity(model, tokens, eval_seqlen, eval_windows, progress=False)
            finally:
                _restore(model, dense)
            row = {"method": label, "kind": method, "formula": str(tree) if tree is not None else None,
                   "pattern": pattern_text, "sparsity": sparsity, "sparsity_actual": report.sparsity_actual,
                   "ppl": ppl, "seconds": round(time.perf_counter() - start, 2)}
            rows.append(row)
            log.info("sweep %d/%d: %-12s %-12s %.2f  perplexity %.4f (actual sparsity %.4f, %.1f s)", len(rows), total,
                     label[:40], pattern_text, sparsity, ppl, report.sparsity_actual, row["seconds"])
            if on_cell:
                on_cell(row)
    return {
        "dense_ppl": dense_ppl,
        "eval": {"seqlen": eval_seqlen, "windows": n_windows, "tokens": n_tokens},
        "methods": [{"label": label, "kind": m, "formula": str(tree) if tree is not None else None} for label, m, tree in methods],
        "cells": rows,
        "seconds": round(time.perf_counter() - start_all, 1),
    }


def parse_sparsities(text: str) -> list[float]:
    if not text.strip():
        return []
    out = []
    for part in text.split(","):
        try:
            out.append(float(part))
        except ValueError:
            raise UserError(f"--sweep-sparsities: {part.strip()!r} is not a number; give fractions such as 0.3,0.5,0.7") from None
    return out


def parse_patterns(text: str) -> list[str]:
    return [] if text.strip().lower() in ("", "none") else [p.strip() for p in text.split(",")]


def tree_label(rank: int, formula: str) -> str:
    """``#1 mul(W, sqrt(X))``, with ``(= wanda)`` when the metric is a known one in another spelling."""
    key = Tree.parse(formula).symbolic_key()
    same = [n for n, m in KNOWN_METRICS.items() if m.tree.symbolic_key() == key]
    return f"#{rank} {formula}" + (f" (= {same[0]})" if same else "")


def run_sweep(run_dir: Path, cfg: dict[str, Any], hof: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """The sweep of a run's top metrics on the run's model, with the calibration of the run."""
    sparsities, patterns = parse_sparsities(args.sweep_sparsities), parse_patterns(args.patterns)
    sweep_cells(sparsities, patterns)  # validate before loading anything
    device = pick_device(args.device or (cfg.get("model") or {}).get("device") or "auto")
    c = cfg.get("calibration") or {}
    data_dir = args.data_dir or c.get("data_dir")
    # one set of windows for X and G: G's when the run took G from windows of its own
    run_calib = Calibration(c.get("source", "wikitext2"), c.get("split"),
                            c.get("gradient_nsamples") or c.get("nsamples", 32),
                            c.get("gradient_seqlen") or c.get("seqlen", 2048), c.get("seed", 0), c.get("data_dir"))
    calib = Calibration(run_calib.source, run_calib.split, args.nsamples or run_calib.nsamples,
                        args.seqlen or run_calib.seqlen, run_calib.seed, data_dir)
    eval_seqlen = args.eval_seqlen or (1024 if device == "cpu" else 2048)
    trees = [(tree_label(r["rank"], r["formula"]), Tree.parse(r["formula"])) for r in hof]
    name = (cfg.get("model") or {}).get("name")
    if not name:
        raise UserError(f"{run_dir / 'config.yaml'} names no model (model.name); the sweep needs one")

    model, tokenizer, source = load_model(name, device)
    tokens = eval_tokens(tokenizer, data_dir=data_dir)
    windows = calib.windows(tokenizer)
    gradients = None
    if any("G" in t.terminals for _, t in trees):
        # The run folder holds G of the run's own calibration; another calibration goes to the cache.
        folder = run_dir if calib.key() == run_calib.key() else args.cache_dir
        gradients = gradients_for(model, source, windows, calib, folder)
    result = sparsity_sweep(model, tokens, trees, windows=windows, gradients=gradients, sparsities=sparsities,
                            patterns=patterns, eval_seqlen=eval_seqlen, eval_windows=args.sweep_windows)
    result.update(model=name, device=device, eval_data="wikitext2:test", calibration=calib.key(),
                  made=now_utc())
    return result


# ---------------------------------------------------------------------------------------- figures


def now_utc() -> str:
    return _dt.datetime.now().isoformat(timespec="seconds")
