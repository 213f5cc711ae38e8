"""What one candidate costs inside the weight update, and whether the cheap fitness ranks rules as the
reference procedure does.

For a config with ``fitness.update: obs`` (default ``configs/discover-obs-50.yaml``), on its model,
fitness text and calibration:

- the floor: one forward pass over the fitness tokens (what every candidate pays at least);
- per-candidate seconds (median over the rules) of a metric without the update (``once``), of a rule
  inside the update with the factors computed once from the dense model (``obs`` / ``once``), and
  with the Hessians re-collected block by block on the partly reconstructed model (``obs`` /
  ``sequential``, SparseGPT's own procedure);
- the fitness of every rule in both obs modes, and their Spearman rank correlation.

Writes ``--out`` (JSON) after each rule, so a stopped run keeps what it measured, and prints a line
per measurement. The run folder (``--run-dir``) keeps X, G and the factors for a second run.

    python benchmarks/obs_study.py --rules 20 --out results/obs/study-50.json
    python benchmarks/obs_study.py --config configs/discover-obs-2of4.yaml --rule "sqr(mul(W, D))" \
        --rule "mul(W, sqrt(X))" --out results/obs/study-2of4.json
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import time
from pathlib import Path
from typing import Any

from scipy.stats import spearmanr

from prunerzero.config import load_config
from prunerzero.files import write_json
from prunerzero.fitness.model_fitness import ModelFitness
from prunerzero.models import load_model
from prunerzero.primitives.known import KNOWN_METRICS
from prunerzero.primitives.tree import Tree
from prunerzero.runfolder import fitness_settings

log = logging.getLogger("obs_study")

# Rules inside the update: SparseGPT's, the known metrics, the shipped winners' shapes, and variations
# that move weight between W, D, X and G (the kinds of trees a search breeds).
RULES = (
    "sqr(mul(W, D))", "mul(W, sqrt(X))", "mul(add(coln(W), rown(W)), sqrt(sqrt(X)))", "mul(abs(mul(W, W)), mms(G))",
    "W", "mul(W, D)", "mul(sqr(W), D)", "mul(W, sqr(D))", "mul(W, X)", "mul(W, add(D, sqrt(X)))",
    "mul(sqr(mul(W, D)), sqrt(X))", "add(sqr(mul(W, D)), mul(W, sqrt(X)))", "mul(mul(W, D), mms(G))",
    "mul(rown(W), D)", "mul(W, sqrt(D))", "add(mul(W, D), G)", "mul(sqr(mul(W, D)), mms(G))",
    "div(mul(W, D), sqrt(X))", "mul(coln(W), D)", "mul(W, mul(D, sqrt(X)))",
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/discover-obs-50.yaml")
    p.add_argument("--rules", type=int, default=len(RULES), help=f"how many of the {len(RULES)} rules (in order)")
    p.add_argument("--rule", action="append", default=None, metavar="FORMULA",
                   help="a rule to measure instead of the built-in list (repeat the flag for more)")
    p.add_argument("--modes", default="once,sequential", help="obs statistics modes to measure")
    p.add_argument("--run-dir", default="runs/obs-study", help="where X, G and the OBS factors are kept")
    p.add_argument("--out", required=True, help="JSON record (written after every rule)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    cfg = load_config(args.config)
    base = fitness_settings(cfg)
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model, tokenizer, source = load_model(base.model, base.device)
    rules = [Tree.parse(r) for r in (args.rule or RULES[: args.rules])]
    modes = args.modes.split(",")
    out: dict[str, Any] = {"config": args.config, "model": base.model, "sparsity": base.sparsity,
                           "pattern": base.pattern,
                           "fitness_tokens": f"{base.windows} x {base.seqlen}", "calibration": base.calibration.key(),
                           "rules": [str(r) for r in rules], "fitness": {}, "seconds": {}, "setup_seconds": {}}

    plain = ModelFitness(dataclasses.replace(base, update="none"), run_dir, model, tokenizer, source)
    floor = []
    for _ in range(3):
        start = time.perf_counter()
        plain.forward_loss()
        floor.append(time.perf_counter() - start)
    out["floor_forward_seconds"] = statistics.median(floor)
    log.info("floor: one forward over the fitness tokens %.2f s", out["floor_forward_seconds"])
    metrics = [m.tree for m in KNOWN_METRICS.values() if "D" not in m.tree.terminals]
    out["seconds"]["metric/once"] = []
    for tree in metrics:
        res = plain.evaluate(tree)
        out["seconds"]["metric/once"].append(res.seconds)
        log.info("metric once %-45s %.3f in %.2f s", tree, res.fitness, res.seconds)

    for mode in modes:
        start = time.perf_counter()
        fit = ModelFitness(dataclasses.replace(base, update="obs", stats_mode=mode), run_dir, model, tokenizer, source)
        out["setup_seconds"][f"obs/{mode}"] = time.perf_counter() - start
        out["fitness"][f"obs/{mode}"], out["seconds"][f"obs/{mode}"] = [], []
        for tree in rules:
            fit.known_masks.clear()  # every rule measured, not looked up
            res = fit.evaluate(tree)
            out["fitness"][f"obs/{mode}"].append(res.fitness)
            out["seconds"][f"obs/{mode}"].append(res.seconds)
            log.info("obs %-10s %-45s %.3f in %.1f s", mode, tree, res.fitness, res.seconds)
            write_json(args.out, out)
    out["median_seconds"] = {k: statistics.median(v) for k, v in out["seconds"].items() if v}
    if all(f"obs/{m}" in out["fitness"] for m in ("once", "sequential")):
        rho = spearmanr(out["fitness"]["obs/once"], out["fitness"]["obs/sequential"]).statistic
        out["spearman_once_vs_sequential"] = float(rho)
    write_json(args.out, out)
    for k, v in out["median_seconds"].items():
        print(f"{k:16s} median {v:6.2f} s per candidate ({v / out['floor_forward_seconds']:.1f}x the forward floor)")
    if "spearman_once_vs_sequential" in out:
        print(f"Spearman (obs once vs sequential, {len(rules)} rules): {out['spearman_once_vs_sequential']:.3f}")


if __name__ == "__main__":
    main()
