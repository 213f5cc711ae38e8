"""The headline table: known metrics and prunerzero's discovered metrics on held-out text.

Every cell is one JSON record in ``--out`` (default ``results/headline``), measured once and
skipped on re-run, so the table is built one cell at a time across sessions; run it in the
background and poll. ``--table`` only reads the records and prints the Markdown tables (and writes
the plot); cells not yet measured show as "-".

Protocol (../shared/DESIGN.md): SmolLM2-135M, 32 calibration windows of 2048 tokens from
WikiText-2 validation (seed 0), WikiText-2 test perplexity over non-overlapping 2048-token
windows: the 50% and 2:4 columns on the whole split, the others on the first 32 windows; C4
validation (first 32 windows) for 50% and 2:4; calibration seeds 0, 1, 2 for the 50% column of
wanda, ria and the discovered metrics (first 32 test windows).

    python benchmarks/headline.py --list                         # the cells and which are done
    nohup python benchmarks/headline.py --only 'wanda|ria' &     # measure some cells (regex on the cell id)
    python benchmarks/headline.py --table                        # print the tables from the records
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import re
import sys
import textwrap
from pathlib import Path
from typing import Any, Sequence

from prunerzero.choices import BASELINE_NAMES
from prunerzero.errors import UserError
from prunerzero.evaluation.heldout import Cell, CellRunner, known_cell
from prunerzero.models import pick_device
from prunerzero.primitives.known import KNOWN_METRICS, shipped_trees, tree_update
from prunerzero.primitives.tree import Tree
from prunerzero.pruning.allocation import OWL_LAMBDA

COLUMNS = (("50%", "unstructured", 0.5, None), ("50% (first 32)", "unstructured", 0.5, 32),
           ("2:4", "2:4", 0.5, None), ("4:8", "4:8", 0.5, 32),
           ("60%", "unstructured", 0.6, 32), ("70%", "unstructured", 0.7, 32))
C4_COLUMNS = (("50%", "unstructured", 0.5, 32), ("2:4", "2:4", 0.5, 32))
SEEDS = (0, 1, 2)
# Layerwise allocation (first 32 test windows): uniform (the plain cells above), OWL, and the
# allocations prunerzero searched (results/allocations/NAME.json, copied from RUN/allocation.json);
# SparseGPT and every shipped rule found inside the weight update get these rows too.
ALLOCATION_METRICS = ("wanda", "ria", "wanda-squared-plus-w-g", "sparsegpt")
# Wanda's ranking inside SparseGPT's weight update (the ablation in the Wanda code): what the update
# alone gives a known metric, beside the rules searched inside it.
UPDATE_BASELINES = (("wanda + obs", KNOWN_METRICS["wanda"].formula),)
ALLOCATION_COLUMNS = (("60%", 0.6), ("70%", 0.7))
SEARCHED_ALLOCATIONS = Path(__file__).resolve().parent.parent / "results" / "allocations"


def discovered() -> list[tuple[str, str]]:
    """(name, formula) of every metric shipped in prunerzero/trees/."""
    return [(name, str(Tree.load(path))) for name, path in shipped_trees().items()]


@functools.cache  # read the shipped files once, not once per cell
def updates() -> dict[str, str]:
    """Row -> the weight update its cells prune with: ``obs`` for the rules shipped from a search
    inside the update and for UPDATE_BASELINES, ``none`` for the rest."""
    found = {name: tree_update(name) for name in shipped_trees()}
    return {**found, **{name: "obs" for name, _ in UPDATE_BASELINES}}


def found_unstructured() -> set[str]:
    """Names of the shipped metrics that a search found at an unstructured pattern."""
    return {name for name, path in shipped_trees().items()
            if json.loads(path.read_text()).get("found_by", {}).get("pattern") == "unstructured"}


def cell_for(row: str, formula: str | None, pattern: str, sparsity: float, **kw) -> Cell:
    if formula is None:
        return known_cell(row, pattern=pattern, sparsity=sparsity, **kw)
    return Cell(label=row, method="tree", tree=formula, pattern=pattern, sparsity=sparsity,
                update=updates().get(row, "none"), **kw)


def grid() -> dict[str, list[tuple[str, str, Cell]]]:
    """Tables -> (row, column, cell)."""
    rows = [(b, None) for b in BASELINE_NAMES] + list(UPDATE_BASELINES) + discovered()
    tables: dict[str, list[tuple[str, str, Cell]]] = {"wikitext2": [], "c4": [], "seeds": []}
    for row, formula in rows:
        for col, pattern, sparsity, windows in COLUMNS:
            if row == "dense" and not col.startswith("50%"):
                continue  # dense does not depend on the column, beyond its windows
            tables["wikitext2"].append((row, col, cell_for(row, formula, pattern, sparsity, windows=windows)))
        for col, pattern, sparsity, windows in C4_COLUMNS:
            if row == "dense" and col != "50%":
                continue
            tables["c4"].append((row, col, cell_for(row, formula, pattern, sparsity, windows=windows,
                                                    text="c4:validation")))
        if row in ("wanda", "ria") or (row in found_unstructured() and updates().get(row) != "obs"):
            # the spread of the 50% column: the baselines and the metrics searched for that pattern
            for seed in SEEDS:
                tables["seeds"].append((row, f"seed {seed}", cell_for(row, formula, "unstructured", 0.5, windows=32,
                                                                      calib_seed=seed)))
    tables["allocation"] = allocation_cells(dict(rows))
    return tables


def searched_allocations() -> dict[float, list[Path]]:
    """target sparsity -> the searched allocation files for it (by name): every search is shown."""
    out: dict[float, list[Path]] = {}
    for path in sorted(SEARCHED_ALLOCATIONS.glob("*.json")):
        data = json.loads(path.read_text())
        if data.get("format") == "prunerzero-allocation":  # the folder also holds study records
            out.setdefault(round(float(data["target"]), 4), []).append(path)
    return out


def allocation_cells(formulas: dict[str, str | None]) -> list[tuple[str, str, Cell]]:
    searched = searched_allocations()
    cells = []
    found_inside_update = [name for name, update in updates().items() if update == "obs" and name in shipped_trees()]
    for metric in (*ALLOCATION_METRICS, *found_inside_update):
        if metric not in formulas:
            continue
        for col, sparsity in ALLOCATION_COLUMNS:
            choices = [("uniform", None), ("OWL", "owl")]
            for path in searched.get(sparsity, []):
                # a row per search (the run that found the function), whatever target its file is for;
                # relative to the working folder (the repository root): records name no machine path
                data = json.loads(path.read_text())
                run = data.get("run", path.stem)
                own = str(Tree.parse(formulas[metric] or KNOWN_METRICS[metric].formula)) == data.get("metric")
                inside_update = data.get("update", "none") == "obs"
                if inside_update and not (own or metric == "sparsegpt"):
                    continue  # searched for one rule inside the update: that rule, and SparseGPT beside it
                if data.get("function_from") == "given":  # not the run's best: named; its own rule (and SparseGPT)
                    if not (own or inside_update):
                        continue
                    run = f"{run}: {data['function']}"
                if data.get("lambda", OWL_LAMBDA) != OWL_LAMBDA:  # a spread other than the search's default
                    run = f"{run}, lambda {data['lambda']:g}"
                choices.append((f"searched ({run})", os.path.relpath(path)))
            for name, allocation in choices:
                cells.append((f"{metric} + {name}", col, cell_for(metric, formulas[metric], "unstructured", sparsity,
                                                                   windows=32, allocation=allocation)))
    return cells


def cell_id(table: str, row: str, col: str) -> str:
    return f"{table}/{row}/{col}"


def markdown(tables: dict, runner: CellRunner) -> str:
    out = []
    heads = {"wikitext2": ("WikiText-2 test perplexity (SmolLM2-135M; 50% and 2:4: whole split, 148 windows of 2048; "
                           "the other columns: first 32 windows)"),
             "c4": "C4 validation perplexity (first 32 windows of 2048 tokens)",
             "seeds": "50% unstructured, WikiText-2 test (first 32 windows), calibration seeds 0, 1, 2",
             "allocation": ("Layerwise allocation, unstructured, WikiText-2 test (first 32 windows of 2048): uniform, "
                            "OWL (M 5, lambda 0.08) and the allocation functions prunerzero searched at 70% (each with one "
                            "metric fixed: wanda, or a rule inside the update, shown with that rule and SparseGPT; at 60% "
                            "the same function, applied with prunerzero allocate)")}
    for name, cells in tables.items():
        cols = list(dict.fromkeys(c for _, c, _ in cells))
        rows = list(dict.fromkeys(r for r, _, _ in cells))
        values = {(r, c): runner.done(cell) for r, c, cell in cells}
        spread = name == "seeds"  # the reader wants the mean and how far the seeds lie apart
        extra = ["mean", "max - min"] if spread else []
        out.append(f"**{heads[name]}**\n")
        out.append("| metric | " + " | ".join(cols + extra) + " |")
        out.append("|---|" + "---:|" * (len(cols) + len(extra)))
        for r in rows:
            vals, ppls = [], []
            for c in cols:
                rec = values.get((r, c))
                ok = rec is not None and rec.get("ppl") is not None
                vals.append(f"{rec['ppl']:.3f}" if ok else "-")
                ppls += [rec["ppl"]] if ok else []
            if spread:
                whole = len(ppls) == len(cols)
                vals += [f"{sum(ppls) / len(ppls):.3f}", f"{max(ppls) - min(ppls):.3f}"] if whole else ["-", "-"]
            out.append(f"| {r} | " + " | ".join(vals) + " |")
        out.append("")
        if name in ("wikitext2", "c4"):
            out.extend(gaps(name, cols, values))
        out.extend(commands(name, cells))
    return "\n".join(out)


def commands(table: str, cells: list[tuple[str, str, Cell]]) -> list[str]:
    """One re-run command per cell of a table, folded away under it (a cell with a record is skipped
    unless its record is deleted first; the key is the record's file name)."""
    lines = ["<details><summary>The command behind each cell of this table</summary>\n", "```bash"]
    for r, c, cell in cells:
        pattern = "^" + re.escape(cell_id(table, r, c)).replace("\\ ", " ") + "$"
        lines.append(f"python benchmarks/headline.py --only '{pattern}'   # results/headline/{cell.key()}.json")
    return lines + ["```", "</details>\n"]


GAP_BASELINES = ("wanda", "ria", "pruner-zero", "sparsegpt")


def gaps(table: str, cols: list[str], values: dict) -> list[str]:
    """Each discovered metric against each baseline, column by column: perplexity change in percent
    (negative: the discovered metric prunes better), from the same records as the table above."""
    lines = []
    for name, _ in discovered():
        for base in GAP_BASELINES:
            row = []
            for c in cols:
                mine, theirs = values.get((name, c)), values.get((base, c))
                ok = all(r is not None and r.get("ppl") for r in (mine, theirs))
                row.append(f"{100 * (mine['ppl'] / theirs['ppl'] - 1):+.2f}%" if ok else "-")
            if any(v != "-" for v in row):
                lines.append(f"| {name} vs {base} | " + " | ".join(row) + " |")
    if not lines:
        return []
    text = {"wikitext2": "WikiText-2 test", "c4": "C4 validation"}[table]
    return ([f"*{text}: discovered metrics against the baselines, change in perplexity (negative: better)*\n",
             "| | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)] + lines + [""])


def bar_chart(value: dict[tuple[str, str], float], groups: list[str], series: list[str], path: Path, title: str,
              log_scale: bool, digits: int, hlines: Sequence[tuple[float, str]] = (),
              ylabel: str = "WikiText-2 test perplexity", colors: dict[str, str] | None = None) -> None:
    """Grouped bars, one group per ``groups`` entry and one bar per ``series`` entry, values written on them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_width = max(6.0, 2.0 * len(groups) + 3.2)
    fig, ax = plt.subplots(figsize=(fig_width, 4.6))
    width = 0.8 / max(1, len(series))
    for i, name in enumerate(series):
        xs = [j + i * width for j, g in enumerate(groups) if (g, name) in value]
        ys = [value[(g, name)] for g in groups if (g, name) in value]
        bars = ax.bar(xs, ys, width, label=name, color=(colors or {}).get(name, f"C{i}"))
        # many bars per group: vertical values, or neighbours' numbers run into each other
        ax.bar_label(bars, labels=[f"{y:.{digits}f}" for y in ys], fontsize=7, padding=2,
                     rotation=90 if len(series) > 5 else 0)
    for y, label in hlines:
        ax.axhline(y, color="k", linestyle=":", label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], groups, fontsize=8)
    if log_scale:
        ax.set_yscale("log")
        ax.set_ylim(top=ax.get_ylim()[1] * 2.5)  # room for the vertical values above the tallest bar
    else:
        ax.set_ylim(bottom=0)
    ax.set_ylabel(ylabel + (" (log scale)" if log_scale else ""))
    # a narrow figure (two groups) cuts a long one-line title: wrap it to about 11 characters an inch
    ax.set_title(textwrap.fill(title, width=int(fig_width * 11)), fontsize=9)
    ax.legend(fontsize=7, ncol=3 if log_scale else 2, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def row_colors(rows: Sequence[str]) -> dict[str, Any]:
    """A colour per row, the same in both figures; 20 before any repeats (the default cycle has 10)."""
    from matplotlib import colormaps

    palette = colormaps["tab20"].colors
    return {r: palette[i % len(palette)] for i, r in enumerate(rows)}


PLOT_TEXTS = {"wikitext2": ("WikiText-2 test perplexity", COLUMNS, ""),
              "c4": ("C4 validation perplexity", C4_COLUMNS, "-c4")}


def plot(tables: dict, runner: CellRunner, path: Path) -> None:
    """Bars of the measured cells, one figure per text (``path``, and ``path`` with ``-c4`` for C4),
    one group per column that has data, one bar per row (dense as a dotted line)."""
    every_row = [r for r in dict.fromkeys(r for r, _, _ in tables["wikitext2"]) if r != "dense"]
    for table, (ylabel, columns, suffix) in PLOT_TEXTS.items():
        cells = {(r, c): runner.done(cell) for r, c, cell in tables[table]}
        value = {(c, r): rec["ppl"] for (r, c), rec in cells.items() if rec and rec.get("ppl")}
        rows = [r for r in every_row if any(k[1] == r for k in value)]
        cols = [c for c, *_ in columns if any((c, r) in value for r in rows)]
        if not cols:
            continue
        # dense does not depend on the column: one line, from its widest measurement
        dense = [(value[(c, "dense")], f"dense {value[(c, 'dense')]:.2f} ({c})") for c in cols if (c, "dense") in value][:1]
        kind = ("metrics alone, SparseGPT, and rules inside its weight update (rows named obs)" if "sparsegpt" in rows
                else "metrics without weight updates")
        bar_chart(value, cols, rows, path.with_name(path.stem + suffix + path.suffix),
                  f"SmolLM2-135M, {kind}; lower is better", log_scale=True, digits=1, hlines=dense, ylabel=ylabel,
                  colors=row_colors(every_row))


def wrap_name(name: str, width: int = 18) -> str:
    """A long metric name over lines broken after its hyphens, so neighbouring tick labels stay apart."""
    lines, line = [], ""
    for part in name.split("-"):
        piece = part if not line else f"-{part}"
        if line and len(line) + len(piece) > width:
            lines.append(line + "-")
            line = part
        else:
            line += piece
    return "\n".join(lines + [line])


def plot_allocation(tables: dict, runner: CellRunner, path: Path) -> None:
    """Bars of the measured allocation cells: a group per metric and sparsity, a bar per allocation.
    A linear axis: bars this far apart within one decade read truer than on a log axis."""
    value = {}
    for row, col, cell in tables["allocation"]:
        rec = runner.done(cell)
        if rec and rec.get("ppl"):
            metric, kind = row.split(" + ", 1)
            value[(f"{wrap_name(metric)}\n{col}", kind)] = rec["ppl"]
    groups = list(dict.fromkeys(g for g, _ in value))
    if groups:
        bar_chart(value, groups, list(dict.fromkeys(k for _, k in value)), path,
                  "SmolLM2-135M, layerwise allocation (first 32 test windows); lower is better",
                  log_scale=False, digits=0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/headline", help="folder of the cell records")
    parser.add_argument("--only", default=None, help="measure (or, with --list, list) only cells whose id "
                                                       "(table/row/column) matches this regex")
    parser.add_argument("--list", action="store_true", help="list the cells and whether each is measured")
    parser.add_argument("--table", action="store_true", help="print the tables from the records (no measuring)")
    parser.add_argument("--plot", default="results/headline.png")
    parser.add_argument("--readme", default=None, help="with --table: also write the tables into this file's "
                                                         "<!-- headline:start/end --> markers")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N; the device "
                                                          "is written in each record")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        device = pick_device(args.device)
    except UserError as err:
        parser.error(str(err))
    runner = CellRunner(Path(args.out), data_dir=args.data_dir, device=device)
    tables = grid()
    if args.list:  # with --only: the cells that regex would measure, to check it before a long run
        for name, cells in tables.items():
            for r, c, cell in cells:
                if args.only is not None and not re.search(args.only, cell_id(name, r, c)):
                    continue
                rec = runner.done(cell)
                print(f"{'done' if rec else 'todo'}  {cell_id(name, r, c):40s}  {cell.key()}"
                      + (f"  ppl {rec['ppl']:.3f}" if rec and rec.get("ppl") else ""))
        return 0
    if args.table:
        text = markdown(tables, runner)
        print(text)
        plot(tables, runner, Path(args.plot))
        plot_allocation(tables, runner, Path(args.plot).with_name("allocation.png"))
        if args.readme:
            readme = Path(args.readme).read_text()
            start, end = "<!-- headline:start -->", "<!-- headline:end -->"
            i, j = readme.index(start) + len(start), readme.index(end)
            Path(args.readme).write_text(readme[:i] + "\n" + text + "\n" + readme[j:])
        return 0
    todo = [cell for name, cells in tables.items() for r, c, cell in cells
            if args.only is None or re.search(args.only, cell_id(name, r, c))]
    runner.run(list(dict.fromkeys(todo)))
    print(markdown(tables, runner))
    return 0


if __name__ == "__main__":
    sys.exit(main())
