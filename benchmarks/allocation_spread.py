"""One allocation function at several spreads: the fitness of an allocation search's config for
each lambda (each layer's sparsity in ``[target - lambda, target + lambda]``; OWL's default 0.08).

A searched allocation function fixes the *order* of the layers; lambda, how far apart their
sparsities go, is fixed by the config, not searched. This measures it on the config's own fitness
text (validation, disjoint from the calibration), the metric and update fixed as the config says, so
the spread is chosen on validation and only the chosen allocation is measured on test. Each finished
lambda is written to ``--out`` at once and skipped on a re-run.

    python benchmarks/allocation_spread.py configs/allocation-70-obs-root4-table.yaml \\
        --function "sub(mms(B), mms(D))" --lambdas 0.08,0.12,0.16 \\
        --out results/allocations/spread-root4-70.json

Then ``--write LAMBDA --allocation-out FILE`` writes that spread's allocation (a file ``--allocation``
and the headline table read, ``function_from: given``) without pruning anything.

``--allocation-file FILE`` instead of ``--function`` takes an allocation as a search wrote it, with
the features it was computed from (a function's B reads the outlier ratio of *its* search's metric),
and moves each layer ``lambda / its lambda`` times as far from the target: OWL's mapping is linear
in lambda, so that is the same function at another spread.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from prunerzero.config import load_config
from prunerzero.errors import UserError
from prunerzero.files import read_json, write_json
from prunerzero.fitness.allocation_fitness import AllocationEvaluator, allocation_of
from prunerzero.primitives.tree import Tree
from prunerzero.pruning.allocation import Allocation, exact_counts
from prunerzero.runs import model_evaluator

log = logging.getLogger("allocation_spread")


def lambdas_of(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--lambdas takes numbers separated by commas, e.g. 0.08,0.12, got {text!r}") from None
    if not values or any(not 0 <= v < 1 for v in values):
        raise UserError(f"--lambdas must each be in [0, 1), got {text!r}")
    return values


def stretched(allocation: Mapping[str, float], sizes: Mapping[str, int], target: float, factor: float,
              low: float, high: float, method: str) -> Allocation:
    """An allocation file's sparsities moved ``factor`` times as far from the target. OWL's mapping
    is linear in lambda, so this is the file's function at ``factor`` times its lambda (up to the
    rounding of the counts), without its features."""
    ratios = {n: target + factor * (r - target) for n, r in allocation.items()}
    return exact_counts(ratios, sizes, target, low, high, method)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="an allocation search's config (search.space: allocation)")
    given = p.add_mutually_exclusive_group(required=True)
    given.add_argument("--function", help="the allocation function, e.g. 'sub(mms(B), mms(D))'")
    given.add_argument("--allocation-file", help="an allocation file (its function's features as they were "
                                                 "computed, its sparsities stretched to each lambda)")
    p.add_argument("--lambdas", default="0.08,0.12,0.16", help="spreads to score, comma-separated")
    p.add_argument("--out", required=True, help="the JSON record (finished lambdas are skipped on a re-run)")
    p.add_argument("--write", type=float, default=None, help="write this lambda's allocation instead of scoring")
    p.add_argument("--allocation-out", default=None, help="with --write: the allocation JSON to write")
    p.add_argument("--run", default=None, help="with --write: the search the function came from (its label)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    cfg = load_config(args.config)
    if cfg.search.space != "allocation":
        raise UserError(f"{args.config} is not an allocation search (search.space: allocation)")
    lambdas = lambdas_of(args.lambdas)
    if args.write is not None and not args.allocation_out:
        raise UserError("--write needs --allocation-out FILE")
    source: dict[str, Any] | None = None
    if args.allocation_file:
        source = read_json(args.allocation_file, "allocation file")
        if not isinstance(source, dict) or not isinstance(source.get("layers"), dict) or "lambda" not in source:
            raise UserError(f"{args.allocation_file} is not an allocation file written by prunerzero "
                            "(it needs layers and lambda)")
        if source.get("target") != cfg.fitness.sparsity:
            raise UserError(f"{args.allocation_file} is for sparsity {source.get('target')}, the config for "
                            f"{cfg.fitness.sparsity}; use prunerzero allocate for another target")
        function = Tree.parse(source["function"])
    else:
        function = Tree.parse(args.function)
    a = cfg.fitness.allocation
    out = Path(args.out)
    record: dict[str, Any] = read_json(out, "spread record") if out.is_file() else {
        "config": args.config, "function": str(function), "metric": cfg.search.metric,
        "allocation_file": args.allocation_file, "update": cfg.fitness.update, "target": cfg.fitness.sparsity,
        "calibration": f"{cfg.calibration.nsamples} x {cfg.calibration.seqlen} {cfg.calibration.source} "
                       f"{cfg.calibration.split}, seed {cfg.calibration.seed}",
        "fitness_text": f"{cfg.fitness.windows} x {cfg.fitness.seqlen} {cfg.fitness.text} {cfg.fitness.split} "
                        "(disjoint from the calibration)",
        "stats_mode": cfg.fitness.stats_mode, "by_lambda": {}}
    if (record["function"], record["metric"], record.get("allocation_file")) != (
            str(function), cfg.search.metric, args.allocation_file):
        raise UserError(f"{out} records {record['function']} (file {record.get('allocation_file')}) with the metric "
                        f"{record['metric']}; give another --out")

    base = model_evaluator(cfg)
    assert isinstance(base, AllocationEvaluator)

    def allocation_at(lam: float) -> Allocation:
        if source is None:
            # the run's features, computed once by the evaluator; only the spread changes
            return allocation_of(function, base.features, base.sizes, cfg.fitness.sparsity, lam, a.range[0], a.range[1])
        return stretched(source["layers"], base.sizes, cfg.fitness.sparsity, lam / source["lambda"],
                         a.range[0], a.range[1], f"searched:{function}")

    if args.write is not None:
        measured = record["by_lambda"].get(f"{args.write:g}", {}).get("fitness")
        made_with = (f"benchmarks/allocation_spread.py {args.config} "
                     + (f"--allocation-file {args.allocation_file}" if source else f"--function '{function}'")
                     + f" --write {args.write:g}: lambda chosen on {record['fitness_text']}")
        data = {**allocation_at(args.write).to_json(cfg.fitness.sparsity), "function": str(function),
                "metric": str(base.metric),  # the rule it is for
                "update": cfg.fitness.update, "lambda": args.write, "range": list(a.range), "fitness": measured,
                "run": args.run or (source or {}).get("run") or cfg.name, "function_from": "given",
                "made_with": made_with}
        if source:  # the function's features were those of the file's own metric
            data["features_from"] = source.get("metric")
        write_json(Path(args.allocation_out), data)
        log.info("wrote %s (lambda %g)", args.allocation_out, args.write)
        return

    command = "python " + " ".join(shlex.quote(arg) for arg in sys.argv)
    for lam in lambdas:
        key = f"{lam:g}"
        if key in record["by_lambda"]:
            log.info("lambda %s: %.3f already measured, skipped", key, record["by_lambda"][key]["fitness"])
            continue
        alloc = allocation_at(lam)
        ratios = alloc.ratios.values()
        start = time.perf_counter()
        base.fitness.allocation = alloc
        try:
            result = base.fitness.evaluate(base.metric)
        finally:
            base.fitness.allocation = None
        seconds = time.perf_counter() - start
        record["by_lambda"][key] = {"fitness": result.fitness, "seconds": round(seconds, 1),
                                    "min_sparsity": min(ratios), "max_sparsity": max(ratios), "command": command}
        write_json(out, record)
        log.info("lambda %s: fitness %.3f (layers %.3f-%.3f), %.0f s", key, result.fitness, min(ratios),
                 max(ratios), seconds)


if __name__ == "__main__":
    try:
        main()
    except UserError as e:  # one line, status 2, as the command line does
        log.error("%s", e)
        raise SystemExit(2) from None
