"""How well cheap fitnesses rank rules against a validation re-score (longer windows, sequential).

Reads what was already measured, measures nothing: a re-score record (``prunerzero rescore RUN``:
8 x 2048 unused validation tokens, SparseGPT's sequential procedure) and the fitness each rule got
on the search's text, from the run's record (its once-mode fitness) and from an obs study
(``benchmarks/obs_study.py``: the same rules once and sequentially on the 8 x 512 fitness text)
and/or the search's record (``results/searches/NAME.json``: the fitness of its seeded known rules,
which a re-score measures as baselines). Prints and writes the Spearman correlations over the rules
each pair shares.

    python benchmarks/rescore_agreement.py --rescore results/rescore/discover-obs-2of4-sequential-8x1024.json \\
        --study results/obs/study-2of4.json --out results/obs/agreement-2of4.json
    python benchmarks/rescore_agreement.py --rescore results/rescore/discover-obs-2of4-long-sequential-8x1024.json \\
        --search results/searches/discover-obs-2of4-long.json --out results/obs/agreement-2of4-long.json
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from scipy.stats import spearmanr

from prunerzero.files import read_json, write_json
from prunerzero.primitives.known import resolve_tree

log = logging.getLogger("rescore_agreement")


def rescored(record: dict) -> dict[str, dict[str, float]]:
    """symbolic key -> {formula, rescore, fitness (the search's, when the tree is one of its top)}."""
    out: dict[str, dict] = {}
    for formula, entry in record["trees"].items():
        key = resolve_tree(formula).symbolic_key()
        out[key] = {"formula": formula, "rescore": entry["perplexity"], "once_fitness": entry["fitness"]}
    for formula, entry in record["baselines"].items():
        key = resolve_tree(formula).symbolic_key()
        out.setdefault(key, {"formula": formula, "rescore": entry["perplexity"]})["name"] = entry["name"]
    return out


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rescore", type=Path, required=True, help="a re-score record (results/rescore/*.json)")
    p.add_argument("--study", type=Path, help="an obs study record (results/obs/study-*.json)")
    p.add_argument("--search", type=Path, help="the search's record (results/searches/NAME.json): the once-mode "
                                               "fitness of its seeded known rules")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    rules = rescored(read_json(args.rescore, "re-score record"))
    if args.study is None and args.search is None:
        p.error("give --study, --search or both: the cheap fitnesses to compare with the re-score")
    if args.search is not None:
        for reference in read_json(args.search, "search record")["reference_fitness"].values():
            entry = rules.get(resolve_tree(reference["tree"]).symbolic_key())
            if entry is not None and not reference.get("estimated"):
                entry.setdefault("once_fitness", reference["fitness"])
    if args.study is not None:
        study = read_json(args.study, "obs study record")
        for formula, once, seq in zip(study["rules"], study["fitness"]["obs/once"], study["fitness"]["obs/sequential"]):
            entry = rules.get(resolve_tree(formula).symbolic_key())
            if entry is not None:
                entry.setdefault("once_fitness", once)
                entry["sequential_fitness"] = seq
    pairs = {}
    for cheap in ("once_fitness", "sequential_fitness"):
        shared = [r for r in rules.values() if cheap in r]
        rho = spearmanr([r[cheap] for r in shared], [r["rescore"] for r in shared]).statistic if len(shared) > 2 else None
        pairs[f"{cheap} vs rescore"] = {"rules": len(shared), "spearman": None if rho is None else float(rho)}
        log.info("%-28s %2d rules  Spearman %s", f"{cheap} vs rescore", len(shared),
                 "-" if rho is None else f"{rho:.3f}")
    both = [r for r in rules.values() if "once_fitness" in r and "sequential_fitness" in r]
    for cheap in ("once_fitness", "sequential_fitness") if len(both) > 2 else ():
        rho = spearmanr([r[cheap] for r in both], [r["rescore"] for r in both]).statistic
        pairs[f"{cheap} vs rescore, rules in all three"] = {"rules": len(both), "spearman": float(rho)}
        log.info("%-28s %2d rules  Spearman %.3f (the rules measured all three ways)", f"{cheap} vs rescore",
                 len(both), rho)
    write_json(args.out, {
        "what": "Spearman correlation of cheap fitnesses (once-mode and sequential on the search's fitness "
                "text) with a sequential re-score on 8 x 2048 unused validation tokens (lower perplexity is better)",
        "rescore": str(args.rescore), "study": args.study and str(args.study), "search": args.search and str(args.search),
        "command": "python benchmarks/rescore_agreement.py --rescore " + str(args.rescore)
                   + "".join(f" --{flag} {value}" for flag, value in (("study", args.study), ("search", args.search)) if value)
                   + " --out " + str(args.out),
        "agreement": pairs,
        "rules": sorted(rules.values(), key=lambda r: r["rescore"]),
    })
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
