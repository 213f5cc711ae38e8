"""Zero-shot table of the README: dense, wanda 50% and the published Pruner-Zero tree 50% on the
seven tasks of the pruning papers (lm-eval stock tasks on local data), ``--limit`` examples each.

    python benchmarks/zeroshot_table.py --limit 50 --wanda-model runs/wanda50 --out runs/zeroshot.json
"""

from __future__ import annotations

import argparse
import json
import logging

import torch

from prunerzero.evaluation.zeroshot import KNOWN_TASKS, evaluate_zeroshot, format_table
from prunerzero.models import load_model
from prunerzero.pruning.calibration import Calibration, gradients_for
from prunerzero.pruning.masks import Pattern
from prunerzero.pruning.prune import (
    PRUNER_ZERO_TREE,
    layer_sparsity_total,
    measure_sparsity,
    prune_model,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--wanda-model", default=None, help="a saved wanda-50%% model; pruned here if not given")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--out", default="runs/zeroshot.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    calib = Calibration("wikitext2", "validation", args.nsamples, args.seqlen, 0)
    results = {}
    for name in ("dense", "wanda-50%", "pruner-zero-50%"):
        if name == "wanda-50%" and args.wanda_model:
            model, tok, src = load_model(args.wanda_model)
        else:
            model, tok, src = load_model("smollm2-135m")
        windows = calib.windows(tok)
        if name == "wanda-50%" and not args.wanda_model:
            prune_model(model, "wanda", 0.5, Pattern(), windows=windows)
        if name == "pruner-zero-50%":
            prune_model(model, "tree", 0.5, Pattern(), tree=PRUNER_ZERO_TREE, gradients=gradients_for(model, src, windows, calib))
        with torch.no_grad():
            res = evaluate_zeroshot(model, tok, list(KNOWN_TASKS), limit=args.limit)
        res["sparsity"] = layer_sparsity_total(measure_sparsity(model))
        results[name] = res
        print(f"## {name} (sparsity {res['sparsity']:.3f})\n{format_table(res)}", flush=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
