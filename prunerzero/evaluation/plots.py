"""The report's figures (matplotlib, Agg): fitness over generations and the sparsity sweep."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Sequence

from prunerzero.fitness.base import WORST_FITNESS

log = logging.getLogger(__name__)

def pyplot():
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


def save_png(fig: Any, path: Path) -> bytes:
    import io
    import os

    plt = pyplot()
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
    plt = pyplot()
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
    return save_png(fig, path)


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


def shorten(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def is_finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def sweep_figure(sweep: dict[str, Any], path: Path, title: str = "") -> bytes:
    """Perplexity (log) against sparsity, one line per method; N:M patterns in a second panel."""
    plt = pyplot()
    cells = [c for c in sweep["cells"] if is_finite(c.get("ppl"))]
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
                (h,) = ax.plot(*zip(*pts), label=shorten(m["label"]), markersize=5, **styles[m["label"]])
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
    if dense is not None and is_finite(dense):
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
                (h,) = nm_ax.plot(*zip(*pts), linestyle="none", markersize=7, label=shorten(m["label"]), **st)
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
    return save_png(fig, path)


# ---------------------------------------------------------------------------------------- HTML


def allocation_figure(allocation: dict[str, Any], log_rows: Sequence[dict[str, Any]], path: Path) -> bytes:
    """A searched allocation: its best fitness per generation against OWL's and uniform's (left),
    and the sparsity it gives each layer, attention and MLP apart (right)."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    gens = [r["generation"] for r in log_rows if r.get("best") is not None]
    bests = [r["best"] for r in log_rows if r.get("best") is not None]
    left.plot(gens, bests, marker="o", label="searched (best so far)")
    reference = allocation.get("reference") or {}
    for name, style in (("owl", "--"), ("uniform", ":")):
        if reference.get(name) is not None and reference[name] < WORST_FITNESS:
            left.axhline(reference[name], linestyle=style, color="k", label=f"{name} {reference[name]:.3f}")
    from matplotlib.ticker import MaxNLocator

    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.set_xlabel("generation")
    left.set_ylabel("fitness (perplexity on the fitness text)")
    left.set_title("fitness text: searched allocation against OWL and uniform", fontsize=9)
    left.legend(fontsize=8)
    left.grid(True, alpha=0.3)
    layers = allocation["layers"]
    names = list(layers)
    for kind, color in (("attention", "tab:blue"), ("mlp", "tab:orange")):
        idx = [i for i, n in enumerate(names) if ("attn" in n) == (kind == "attention")]
        right.scatter(idx, [layers[names[i]] for i in idx], s=10, color=color, label=kind)
    right.axhline(allocation["target"], color="k", linestyle=":", label=f"target {allocation['target']:g}")
    right.set_xlabel("layer (model order)")
    right.set_ylabel("sparsity")
    right.set_title(f"per-layer sparsity of {allocation.get('function', '?')}"[:90], fontsize=9)
    right.legend(fontsize=8)
    right.grid(True, alpha=0.3)
    fig.tight_layout()
    return save_png(fig, path)
