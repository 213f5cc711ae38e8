"""``prunerzero report RUN``: one self-contained HTML page about a search run.

The page shows the run's configuration, its best metrics, the search counters and the
fitness-over-generations plot, all read from the run folder (no model is loaded). With
``--sweep`` it also measures WikiText-2 *test* perplexity of the top metrics against magnitude,
Wanda and SparseGPT at several unstructured sparsities and N:M patterns (this loads the run's
model and costs one pruning and one evaluation per cell); the sweep is written to
``RUN/sweep.json`` and ``RUN/sweep.png``, and a later report without ``--sweep`` shows it again.

:func:`sparsity_sweep` is the model-level part and takes pre-tokenized text, so it can be
called on any in-memory model.
"""

from __future__ import annotations

import argparse
import base64
import datetime as _dt
import html
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml

from prunerzero.errors import UserError
from prunerzero.data import eval_tokens
from prunerzero.evaluation.perplexity import perplexity, window_count
from prunerzero.fitness.base import WORST_FITNESS
from prunerzero.models import load_model
from prunerzero.models import pick_device
from prunerzero.primitives.known import KNOWN_METRICS
from prunerzero.primitives.tree import Tree
from prunerzero.pruning.calibration import Calibration, gradients_for
from prunerzero.pruning.masks import Pattern
from prunerzero.pruning.masks import check_sparsity
from prunerzero.pruning.prune import METHODS, prune_model
from prunerzero.search import checkpoint as ckpt
from prunerzero.search.simplify import symbolic_key

log = logging.getLogger(__name__)

REPORT = "report.html"
SWEEP_JSON = "sweep.json"
SWEEP_PLOT = "sweep.png"
DEFAULT_SPARSITIES = (0.3, 0.4, 0.5, 0.6, 0.7)
DEFAULT_PATTERNS = ("2:4", "4:8")
BASELINES = ("magnitude", "wanda", "sparsegpt")
COUNTERS = (
    ("generated", "candidates generated", "children and initial individuals created"),
    ("simplified", "simplified", "candidates rewritten to a smaller equivalent formula"),
    ("regenerated", "regenerated", "re-mutations of children that duplicated a parent or an evaluated metric"),
    ("formula_cache_hits", "formula-cache hits", "candidates whose canonical formula was already evaluated"),
    ("mask_cache_hits", "mask-cache hits", "new formulas whose masks equal an earlier metric's (not re-measured)"),
    ("evaluated", "evaluated", "fitness evaluations actually run"),
    ("degenerate", "degenerate", "metrics that cannot rank weights (constant, NaN or Inf)"),
)


# ---------------------------------------------------------------------------------------- sweep
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
    baselines: Sequence[str] = BASELINES,
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
        if b not in METHODS or b == "tree":
            raise UserError(f"unknown baseline {b!r}; choose among {', '.join(BASELINES)}")
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


def _parse_sparsities(text: str) -> list[float]:
    if not text.strip():
        return []
    out = []
    for part in text.split(","):
        try:
            out.append(float(part))
        except ValueError:
            raise UserError(f"--sweep-sparsities: {part.strip()!r} is not a number; give fractions such as 0.3,0.5,0.7") from None
    return out


def _parse_patterns(text: str) -> list[str]:
    return [] if text.strip().lower() in ("", "none") else [p.strip() for p in text.split(",")]


def _tree_label(rank: int, formula: str) -> str:
    """``#1 mul(W, sqrt(X))``, with ``(= wanda)`` when the metric is a known one in another spelling."""
    key = symbolic_key(Tree.parse(formula))
    same = [n for n, m in KNOWN_METRICS.items() if symbolic_key(m.tree) == key]
    return f"#{rank} {formula}" + (f" (= {same[0]})" if same else "")


def run_sweep(run_dir: Path, cfg: dict[str, Any], hof: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """The sweep of a run's top metrics on the run's model, with the calibration of the run."""
    sparsities, patterns = _parse_sparsities(args.sweep_sparsities), _parse_patterns(args.patterns)
    sweep_cells(sparsities, patterns)  # validate before loading anything
    device = pick_device(args.device or (cfg.get("model") or {}).get("device") or "auto")
    c = cfg.get("calibration") or {}
    data_dir = args.data_dir or c.get("data_dir")
    run_calib = Calibration(c.get("source", "wikitext2"), c.get("split"), c.get("nsamples", 32), c.get("seqlen", 2048),
                            c.get("seed", 0), c.get("data_dir"))
    calib = Calibration(run_calib.source, run_calib.split, args.nsamples or run_calib.nsamples,
                        args.seqlen or run_calib.seqlen, run_calib.seed, data_dir)
    eval_seqlen = args.eval_seqlen or (1024 if device == "cpu" else 2048)
    trees = [(_tree_label(r["rank"], r["formula"]), Tree.parse(r["formula"])) for r in hof]
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
                  made=_now())
    return result


# ---------------------------------------------------------------------------------------- figures
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _num(v: float) -> str:
    """A tick label: plain up to 9999 (0.002, 30, 5000), then 2×10⁴."""
    if v <= 0 or v < 1e4:
        return f"{v:.4g}"
    k = math.floor(math.log10(v) + 1e-9)
    lead = v / 10**k
    return f"$10^{{{k}}}$" if abs(lead - 1) < 1e-6 else f"${lead:g}\\times10^{{{k}}}$"


def _plain_log_axis(ax: Any) -> None:
    """Log-scale y labels as plain numbers (0.002, 30, 200), not 2x10^-3; between the powers of ten,
    label 2, 3 and 5 when the axis spans little more than a decade, 2 and 5 up to ~2.5 decades."""
    from matplotlib.ticker import FuncFormatter

    lo, hi = ax.get_ylim()
    span = hi / lo if lo > 0 else float("inf")
    plain = FuncFormatter(lambda v, _: _num(v))
    ax.yaxis.set_major_formatter(plain)
    if span < 3:  # too narrow for 2-3-5 ticks: label every tick matplotlib places
        ax.yaxis.set_minor_formatter(plain)
        return
    keep = (2, 3, 5) if span < 20 else (2, 5) if span < 300 else ()

    def minor(v: float, _pos: Any) -> str:
        lead = round(v / 10 ** math.floor(math.log10(v) + 1e-9), 6) if v > 0 else 0
        return _num(v) if lead in keep else ""

    ax.yaxis.set_minor_formatter(FuncFormatter(minor))
    ax.tick_params(axis="y", which="minor", labelsize=8)


def _save(fig: Any, path: Path) -> bytes:
    import io
    import os

    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    data = buf.getvalue()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return data


def fitness_figure(state: Any, ylabel: str, title: str, path: Path) -> bytes | None:
    """Best-so-far and population median per generation (log scale); PNG bytes, also written to ``path``."""
    from matplotlib.ticker import MaxNLocator

    rows = [r for r in state.log if r.get("best") is not None]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    gens = [r["generation"] for r in rows]
    ax.plot(gens, [r["best"] for r in rows], marker="o", color="C0", label="best so far")
    pop = [(r["generation"], r["population_best"]) for r in rows if r.get("population_best") is not None]
    med = [(r["generation"], r["median"]) for r in rows if r.get("median") is not None and r["median"] < WORST_FITNESS]
    if med:
        ax.plot(*zip(*med), marker=".", linestyle="--", color="C1", label="population median")
    if pop and any(p != b for (_, p), b in zip(pop, [r["best"] for r in rows])):
        ax.plot(*zip(*pop), marker=".", linestyle=":", color="C2", label="population best")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("generation")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    last = rows[-1]
    ax.annotate(f"{last['best']:.4g}", (last["generation"], last["best"]), textcoords="offset points", xytext=(0, 7),
                ha="center", fontsize=8, color="C0")
    _plain_log_axis(ax)
    ax.legend(fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


_BASELINE_STYLE = {"magnitude": ("#7f7f7f", "s"), "wanda": ("#1f77b4", "^"), "sparsegpt": ("#2ca02c", "D")}
_TREE_COLORS = ("#d62728", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22")


def _styles(methods: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out, k = {}, 0
    for m in methods:
        if m["kind"] in _BASELINE_STYLE:
            color, marker = _BASELINE_STYLE[m["kind"]]
            # thin dashed baselines drawn over the thick tree lines: a tree equal to a baseline hides neither
            out[m["label"]] = dict(color=color, marker=marker, linestyle="--", linewidth=1.3, zorder=4)
        else:
            out[m["label"]] = dict(color=_TREE_COLORS[k % len(_TREE_COLORS)], marker="o", linestyle="-", linewidth=2.2,
                                   zorder=3)
            k += 1
    return out


def _short(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def sweep_figure(sweep: dict[str, Any], path: Path, title: str = "") -> bytes:
    """Perplexity (log) against sparsity, one line per method; N:M patterns in a second panel."""
    plt = _pyplot()
    cells = [c for c in sweep["cells"] if _finite(c.get("ppl"))]
    unstructured = [c for c in cells if c["pattern"] == "unstructured"]
    patterns = list(dict.fromkeys(c["pattern"] for c in sweep["cells"] if c["pattern"] != "unstructured"))
    styles = _styles(sweep["methods"])
    panels = (1 if unstructured else 0) + (1 if patterns else 0)
    ratios = ([3] if unstructured else []) + ([max(1, len(patterns))] if patterns else [])
    fig, axes = plt.subplots(1, panels, figsize=(9 if panels == 2 else 7, 4.6), sharey=True,
                             gridspec_kw={"width_ratios": ratios}, squeeze=False)
    axes = list(axes[0])
    dense = sweep.get("dense_ppl")
    handles: dict[str, Any] = {}
    if unstructured:
        ax = axes.pop(0)
        for m in sweep["methods"]:
            pts = sorted((c["sparsity"], c["ppl"]) for c in unstructured if c["method"] == m["label"])
            if pts:
                (h,) = ax.plot(*zip(*pts), label=_short(m["label"]), markersize=5, **styles[m["label"]])
                handles[m["label"]] = h
        xs = sorted({c["sparsity"] for c in unstructured})
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{x:.0%}" for x in xs])
        ax.set_xlabel("unstructured sparsity")
        ax.set_ylabel("WikiText-2 test perplexity (log)")
        ax.set_title("unstructured", fontsize=10)
        nm_ax = axes.pop(0) if patterns else None
    else:
        nm_ax = axes.pop(0)
    if dense is not None and _finite(dense):
        for a in fig.axes:
            d = a.axhline(dense, color="black", linestyle=":", linewidth=1, label=f"dense ({dense:.2f})")
        handles["dense"] = d
    if nm_ax is not None:
        n = len(sweep["methods"])
        width = 0.7 / max(n, 1)
        for j, m in enumerate(sweep["methods"]):
            st = dict(styles[m["label"]])
            st.pop("linestyle"), st.pop("linewidth")
            pts = [(i - 0.35 + width * (j + 0.5), c["ppl"]) for i, p in enumerate(patterns)
                   for c in cells if c["pattern"] == p and c["method"] == m["label"]]
            if pts:
                (h,) = nm_ax.plot(*zip(*pts), linestyle="none", markersize=7, label=_short(m["label"]), **st)
                handles.setdefault(m["label"], h)
        nm_ax.set_xticks(range(len(patterns)))
        nm_ax.set_xticklabels(patterns)
        nm_ax.set_xlim(-0.6, len(patterns) - 0.4)
        nm_ax.set_xlabel("N:M pattern")
        nm_ax.set_title("semi-structured", fontsize=10)
        if not unstructured:
            nm_ax.set_ylabel("WikiText-2 test perplexity (log)")
    for a in fig.axes:
        a.set_yscale("log")
        a.grid(True, which="both", alpha=0.3)
    _plain_log_axis(fig.axes[0])
    if title:
        fig.suptitle(title, fontsize=10)
    ncol = 2 if len(handles) > 3 else len(handles)
    fig.legend(list(handles.values()), [h.get_label() for h in handles.values()], loc="lower center", ncol=max(ncol, 1),
               fontsize=8, frameon=False)
    rows = math.ceil(len(handles) / max(ncol, 1))
    fig.tight_layout(rect=(0, 0.045 * rows + 0.02, 1, 1))
    return _save(fig, path)


# ---------------------------------------------------------------------------------------- HTML
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em;margin-bottom:.2em} h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
.meta{color:#666;font-size:.9em} table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
th,td{border:1px solid #ddd;padding:.3em .6em;text-align:left;vertical-align:top} th{background:#f5f5f5}
td.num{text-align:right;font-variant-numeric:tabular-nums} code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.92em}
tr.best td{font-weight:600} td.best{font-weight:700;background:#eef6ee} img{max-width:100%;border:1px solid #eee}
pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:.85em} .note{color:#555;font-size:.9em}
details summary{cursor:pointer;color:#446}
"""


BEST_ROW = ' class="best"'


def _e(v: Any) -> str:
    return html.escape(str(v))


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:.4g}"
    return str(v)


def _ppl(v: Any) -> str:
    """A perplexity for a table: 31.58, 321.57, 1,405, 31,455."""
    if not _finite(v):
        return "–" if v is None else _e(v)
    return f"{v:.2f}" if v < 1000 else f"{v:,.0f}"


def _flatten(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out += _flatten(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", ", ".join(map(str, v)) if isinstance(v, list) else v))
    return out


def fitness_label(cfg: dict[str, Any] | None) -> str:
    if not cfg:
        return "fitness"
    f = cfg.get("fitness") or {}
    where = f"{f.get('sparsity', 0.5):g} {f.get('pattern', 'unstructured')}"
    if (cfg.get("evaluator") or {}).get("type") == "reconstruction":
        return f"relative reconstruction error of a random layer pruned at {where}"
    return (f"perplexity on {f.get('text', 'wikitext2')}:{f.get('split', 'validation')} ({f.get('windows')} × "
            f"{f.get('seqlen')} tokens), model pruned at {where}")


def _known_metrics(state: Any) -> list[tuple[str, str, float]]:
    out = []
    for name, metric in KNOWN_METRICS.items():
        try:
            out.append((name, metric.formula, state.fitness_of(metric.formula)))
        except KeyError:
            pass
    return out


def _sweep_html(sweep: dict[str, Any], png: bytes | None, fresh: bool, json_path: Path) -> str:
    cells = list(dict.fromkeys((c["pattern"], c["sparsity"]) for c in sweep["cells"]))
    by = {(c["method"], c["pattern"], c["sparsity"]): c for c in sweep["cells"]}
    best = {}
    for cell in cells:
        vals = [c["ppl"] for c in sweep["cells"] if (c["pattern"], c["sparsity"]) == cell and _finite(c["ppl"])]
        best[cell] = min(vals) if vals else None
    head = "".join(f"<th>{_e(f'{s:.0%}' if p == 'unstructured' else p)}</th>" for p, s in cells)
    body = []
    for m in sweep["methods"]:
        tds = []
        for cell in cells:
            c = by.get((m["label"], *cell))
            v = c["ppl"] if c else None
            cls = "num best" if v is not None and v == best[cell] else "num"
            tip = f' title="actual sparsity {c["sparsity_actual"]:.4f}, {c["seconds"]} s"' if c else ""
            tds.append(f'<td class="{cls}"{tip}>{_ppl(v)}</td>')
        name = f"<code>{_e(m['label'])}</code>" if m["kind"] == "tree" else _e(m["label"])
        body.append(f"<tr><td>{name}</td>{''.join(tds)}</tr>")
    ev = sweep.get("eval", {})
    cal = sweep.get("calibration") or {}
    origin = "Measured now" if fresh else f"Read from {_e(json_path.name)} (made {_e(sweep.get('made', '?'))}); rerun with --sweep to refresh"
    parts = [
        f'<p class="note">Model <code>{_e(sweep.get("model", "?"))}</code> on {_e(sweep.get("device", "?"))}; '
        f'WikiText-2 test perplexity over the first {_e(ev.get("windows"))} windows of {_e(ev.get("seqlen"))} tokens '
        f'({_e(ev.get("tokens"))} tokens); calibration {_e(cal.get("source", "?"))}:{_e(cal.get("split") or "")} '
        f'{_e(cal.get("nsamples", "?"))} × {_e(cal.get("seqlen", "?"))} tokens, seed {_e(cal.get("seed", "?"))}. '
        f'Dense model: <b>{_ppl(sweep.get("dense_ppl"))}</b>. {origin}. The whole sweep took {_e(sweep.get("seconds", "?"))} s.</p>',
        _img(png, "perplexity against sparsity") if png else "",
        f"<table><tr><th>method</th>{head}</tr>{''.join(body)}</table>",
        '<p class="note">Columns are unstructured sparsities, then N:M patterns; the lowest perplexity of each column is '
        "highlighted. Every cell starts from the dense weights.</p>",
    ]
    return "\n".join(parts)


def render_html(run_dir: Path, state: Any, cfg: dict[str, Any] | None, config_text: str | None, hof: list[dict[str, Any]],
                fitness_png: bytes | None, sweep: dict[str, Any] | None, sweep_png: bytes | None, sweep_fresh: bool,
                top: int) -> str:
    name = (cfg or {}).get("name") or run_dir.name
    evaluator = ((cfg or {}).get("evaluator") or {}).get("type", "?")
    model = ((cfg or {}).get("model") or {}).get("name", "?") if evaluator != "reconstruction" else "none (reconstruction evaluator)"
    generations = state.generation
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>prunerzero report: {_e(name)}</title>",
           f"<style>{CSS}</style></head><body>",
           f"<h1>Pruner-Zero search: {_e(name)}</h1>",
           f'<p class="meta">Run folder <code>{_e(run_dir)}</code> · report made {_e(_now())} · '
           f"{f'generations 0–{generations} done' if generations >= 0 else 'no generation done yet'} · "
           f"{len(state.cache)} distinct metrics seen · evaluator {_e(evaluator)} · model {_e(model)}</p>"]

    out.append("<h2>Best metrics</h2>")
    if hof:
        out.append(f'<p class="note">Fitness: {_e(fitness_label(cfg))}; lower is better. Metrics that prune alike (same masks) are listed once, '
                   f"by their smallest formula. The top {top} {'is' if top == 1 else 'are'} the ones a sweep compares.</p>")
        rows = "".join(
            f"<tr{BEST_ROW if r['rank'] == 1 else ''}><td class='num'>{r['rank']}</td><td><code>{_e(r['formula'])}</code></td>"
            f"<td class='num'>{r['size']}</td><td class='num'>{_fmt(r['fitness'], 6)}</td><td class='num'>{r['generation']}</td></tr>"
            for r in hof)
        out.append(f"<table><tr><th>rank</th><th>formula</th><th>size</th><th>fitness</th><th>generation found</th></tr>{rows}</table>")
    else:
        out.append('<p class="note">No metric has been evaluated yet.</p>')
    known = _known_metrics(state)
    if known:
        rows = "".join(f"<tr><td>{_e(n)}</td><td><code>{_e(f)}</code></td><td class='num'>{_fmt(v, 6)}</td></tr>" for n, f, v in known)
        out.append(f'<p class="note">Known metrics, as measured by this search:</p>'
                   f"<table><tr><th>metric</th><th>formula</th><th>fitness</th></tr>{rows}</table>")

    out.append("<h2>Search counters</h2>")
    c = state.counters
    rows = "".join(f"<tr><td>{_e(label)}</td><td class='num'>{c.get(key, 0)}</td><td class='note'>{_e(doc)}</td></tr>"
                   for key, label, doc in COUNTERS)
    out.append(f"<table><tr><th>counter</th><th>total</th><th>meaning</th></tr>{rows}</table>")

    out.append("<h2>Fitness over generations</h2>")
    out.append(_img(fitness_png, "fitness over generations") if fitness_png else '<p class="note">No generation logged yet.</p>')

    out.append("<h2>Sparsity sweep</h2>")
    if sweep:
        out.append(_sweep_html(sweep, sweep_png, sweep_fresh, run_dir / SWEEP_JSON))
    elif evaluator == "reconstruction":
        out.append('<p class="note">No sweep: this run used the reconstruction evaluator and has no model.</p>')
    else:
        out.append(f'<p class="note">No sweep yet. <code>prunerzero report {_e(run_dir)} --sweep</code> measures test perplexity '
                   "of the top metrics against magnitude, Wanda and SparseGPT (loads the model; one pruning per cell).</p>")

    out.append("<h2>Configuration</h2>")
    if cfg:
        rows = "".join(f"<tr><td><code>{_e(k)}</code></td><td>{_e(v)}</td></tr>" for k, v in _flatten(cfg))
        out.append(f"<table><tr><th>key</th><th>value</th></tr>{rows}</table>")
        out.append(f"<details><summary>config.yaml</summary><pre>{_e(config_text)}</pre></details>")
    else:
        out.append('<p class="note">The run folder has no readable config.yaml.</p>')
    out.append("</body></html>\n")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------- command
def _now() -> str:
    return _dt.datetime.now().isoformat(timespec="seconds")


def _read_config(run_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    path = run_dir / ckpt.CONFIG
    if not path.is_file():
        return None, None
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    return (data if isinstance(data, dict) else None), text


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def make_report(args: argparse.Namespace) -> Path:
    run_dir = Path(args.run)
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} does not exist; give a folder made by `prunerzero search` (runs/NAME)")
    state, _ = ckpt.load_checkpoint(run_dir)
    cfg, config_text = _read_config(run_dir)
    out = Path(args.out) if args.out else run_dir / REPORT
    hof = ckpt.export_trees(state, max(args.top, 10))["trees"]
    sweep, sweep_png, fresh = None, None, False
    if args.sweep:
        if cfg is None:
            raise UserError(f"{run_dir} has no readable {ckpt.CONFIG}; the sweep needs the run's model and calibration")
        if (cfg.get("evaluator") or {}).get("type") == "reconstruction":
            raise UserError(f"the sweep needs a model-based run: {run_dir} was searched with the reconstruction evaluator, "
                            "which has no model (run the report without --sweep)")
        if not hof:
            raise UserError(f"{run_dir} has no evaluated metric yet; nothing to sweep")
        sweep = run_sweep(run_dir, cfg, hof[: args.top], args)
        ckpt.write_atomic(run_dir / SWEEP_JSON, json.dumps(_json_safe(sweep), indent=1) + "\n")
        log.info("wrote %s", run_dir / SWEEP_JSON)
        fresh = True
    elif (run_dir / SWEEP_JSON).is_file():
        try:
            sweep = json.loads((run_dir / SWEEP_JSON).read_text())
        except json.JSONDecodeError:
            log.warning("%s is not valid JSON; the report shows no sweep", run_dir / SWEEP_JSON)
    if sweep:
        sweep_png = sweep_figure(sweep, run_dir / SWEEP_PLOT, f"{sweep.get('model', '')}: test perplexity of the pruned model")
    fitness_png = fitness_figure(state, "fitness (log scale, lower is better)", _short(fitness_label(cfg), 100),
                                 run_dir / ckpt.PLOT)
    page = render_html(run_dir, state, cfg, config_text, hof, fitness_png, sweep, sweep_png, fresh, args.top)
    ckpt.write_atomic(out, page)
    return out
