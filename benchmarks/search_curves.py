"""Several searches' best fitness per generation on one figure, each relative to its own Wanda.

Reads the small records of ``results/searches/`` (made by ``benchmarks/search_record.py``), so seeds
whose fitness texts differ still compare: the y axis is the change against the Wanda fitness of the
same run, in percent (negative: better than Wanda).

    python benchmarks/search_curves.py results/searches/discover-50.json results/searches/discover-50-s1.json \\
        --out results/searches/discover-50-seeds.png --title "50% unstructured, past the known metrics"
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from prunerzero.evaluation.plots import pyplot, save_png

log = logging.getLogger(__name__)


def relative_curve(record: dict) -> tuple[list[int], list[float]]:
    """(generations, best fitness against the run's Wanda fitness in percent)."""
    wanda = record.get("reference_fitness", {}).get("wanda", {}).get("fitness")
    if not wanda:
        raise SystemExit(f"{record.get('run')}: the record has no Wanda fitness to compare with")
    rows = record["per_generation"]
    return [r["generation"] for r in rows], [100 * (r["best"] / wanda - 1) for r in rows]


def label_of(record: dict) -> str:
    best = record["best"]["tree"]
    return f"{record['run']} (seed {record['seed']}): {best}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("records", nargs="+", type=Path, help="records written by benchmarks/search_record.py")
    p.add_argument("--out", type=Path, required=True, help="the PNG to write")
    p.add_argument("--title", default="best fitness per generation")
    args = p.parse_args()
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(9, 4.8 + 0.25 * len(args.records)))
    for path in args.records:
        record = json.loads(path.read_text())
        gens, rel = relative_curve(record)
        ax.step(gens, rel, where="post", marker="o", markersize=3, label=label_of(record))
    ax.axhline(0, color="black", linewidth=0.8, linestyle="--", label="Wanda (seeded in generation 0)")
    ax.set_xlabel("generation")
    ax.set_ylabel("best fitness vs the run's Wanda (%)")
    ax.set_title(args.title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14))  # below: the curves keep the plot
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, args.out)
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
