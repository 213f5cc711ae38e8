"""Fitness fidelity: does the search's fitness rank trees as held-out text does?

For the top ``--top`` trees of a finished search (its hall of fame), on the run's own model and
statistics (so the pruned model is exactly the one the fitness scored), this measures:
- the fitness text (validation, disjoint from calibration) at several budgets: the first k windows
  of the run's fitness seqlen, for every k in ``--budgets``; one pass over the largest budget gives
  every smaller one (budgets are prefixes of the same windows);
- WikiText-2 **test** perplexity over the first ``--test-windows`` windows of ``--test-seqlen``
  tokens: the reference the fitness stands in for.

Then the Spearman rank correlation between each budget and the test perplexity. One JSON record
per tree in ``--out`` (skipped on re-run: a study can be stopped and resumed); ``--summary`` only
reads the records and prints the table (and writes ``summary.json`` beside them).

    nohup python benchmarks/fidelity.py runs/discover-50 --top 20 &
    python benchmarks/fidelity.py runs/discover-50 --summary

The test split is used here because the study is about how well validation fitness predicts the
number reported at the end; no search choice is made on it besides the default budget this study
sets, and that choice is recorded with the study.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from prunerzero.evaluation.heldout import evaluation_tokens
from prunerzero.files import write_json
from prunerzero.fitness.model_fitness import FORWARD_TOKENS, ModelFitness
from prunerzero.perplexity import window_losses
from prunerzero.primitives.tree import Tree
from prunerzero.pruning.prune import masked_weights
from prunerzero.runfolder import fitness_settings, run_config

log = logging.getLogger("fidelity")


def top_trees(run_dir: Path, top: int) -> list[dict]:
    entries = json.loads((run_dir / "hall_of_fame.json").read_text())["trees"]
    return entries[:top]


def record_name(formula: str) -> str:
    return hashlib.sha256(formula.encode()).hexdigest()[:16] + ".json"


def measure(args: argparse.Namespace, out: Path) -> None:
    run_dir = Path(args.run)
    cfg = run_config(run_dir)
    base = fitness_settings(cfg)
    settings = replace(base, windows=max(args.budgets))
    entries = top_trees(run_dir, args.top)
    todo = [e for e in entries if not (out / record_name(e["formula"])).is_file()]
    log.info("%d trees, %d already measured; budgets %s x %d tokens; test %d x %d tokens",
             len(entries), len(entries) - len(todo), args.budgets, settings.seqlen, args.test_windows, args.test_seqlen)
    if not todo:
        return
    fit = ModelFitness(settings, run_dir)
    test = evaluation_tokens(fit.tokenizer, "wikitext2:test", None, args.test_windows * args.test_seqlen)
    for i, entry in enumerate(todo, 1):
        start = time.perf_counter()
        tree = Tree.parse(entry["formula"])
        masks = fit.masks(tree)
        if isinstance(masks, str):
            log.warning("%s cannot rank weights: %s", entry["formula"], masks)
            continue
        with masked_weights(fit.model, masks):
            val = window_losses(fit.model, fit.tokens, settings.seqlen, max(args.budgets), progress=False,
                                windows_per_forward=max(1, FORWARD_TOKENS // settings.seqlen))
            tst = window_losses(fit.model, test, args.test_seqlen, args.test_windows, progress=False)
        rec = {
            "run": run_dir.name, "rank": entry["rank"], "formula": entry["formula"], "size": entry["size"],
            "search_fitness": entry["fitness"],
            "fitness_seqlen": settings.seqlen,
            "fitness_by_budget": {str(k): float(np.exp(np.mean(val[:k]))) for k in args.budgets},
            "test_ppl": float(np.exp(np.mean(tst))), "test_windows": args.test_windows, "test_seqlen": args.test_seqlen,
            "seconds": round(time.perf_counter() - start, 1),
        }
        write_json(out / record_name(entry["formula"]), rec)
        log.info("[%d/%d] %s: fitness %s, test %.3f (%.0f s)", i, len(todo), entry["formula"],
                 {k: round(v, 3) for k, v in rec["fitness_by_budget"].items()}, rec["test_ppl"], rec["seconds"])


def summarise(out: Path) -> dict:
    recs = sorted((json.loads(p.read_text()) for p in out.glob("*.json") if p.name != "summary.json"),
                  key=lambda r: r["test_ppl"])
    if len(recs) < 3:
        raise SystemExit(f"{len(recs)} records in {out}: too few for a rank correlation")
    test = [r["test_ppl"] for r in recs]
    budgets = sorted(recs[0]["fitness_by_budget"], key=int)
    rho = {}
    for b in budgets:
        r, p = spearmanr([x["fitness_by_budget"][b] for x in recs], test)
        rho[b] = {"spearman": float(r), "p": float(p),
                  "tokens": int(b) * recs[0]["fitness_seqlen"],
                  "best_by_fitness_test_ppl": min(recs, key=lambda x: x["fitness_by_budget"][b])["test_ppl"]}
    return {"trees": len(recs), "test_windows": recs[0]["test_windows"], "test_seqlen": recs[0]["test_seqlen"],
            "best_test_ppl": test[0], "budgets": rho, "records": recs}


def print_summary(s: dict) -> None:
    print(f"{s['trees']} trees; reference: WikiText-2 test, first {s['test_windows']} x {s['test_seqlen']} tokens; "
          f"best test ppl among them {s['best_test_ppl']:.3f}")
    print("| fitness budget (windows) | tokens | Spearman vs test | test ppl of the tree the budget ranks first |")
    print("|---:|---:|---:|---:|")
    for b, v in s["budgets"].items():
        print(f"| {b} | {v['tokens']} | {v['spearman']:.3f} | {v['best_by_fitness_test_ppl']:.3f} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a finished search's run folder (hall_of_fame.json, statistics)")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--budgets", type=int, nargs="+", default=[2, 8, 24], help="fitness windows to compare")
    p.add_argument("--test-windows", type=int, default=8)
    p.add_argument("--test-seqlen", type=int, default=2048)
    p.add_argument("--out", default=None, help="records folder (default results/fidelity/RUN)")
    p.add_argument("--summary", action="store_true", help="only read the records and print the table")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if min(args.budgets) < 1 or args.top < 3 or args.test_windows < 1:
        p.error("budgets and --test-windows must be >= 1, --top >= 3")
    out = Path(args.out or f"results/fidelity/{Path(args.run).name}")
    if not args.summary:
        measure(args, out)
    s = summarise(out)
    write_json(out / "summary.json", {k: v for k, v in s.items() if k != "records"})
    print_summary(s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
