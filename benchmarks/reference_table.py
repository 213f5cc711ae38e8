"""The README table: dense, magnitude, wanda, sparsegpt and the published Pruner-Zero tree at 50%
unstructured, 2:4 and 4:8 on one model, with perplexity and pruning time.

The model is loaded once; the dense weights are restored between cells. Calibration is the
reference protocol: ``--nsamples`` windows of ``--seqlen`` tokens from the raw WikiText-2
validation split, seed 0. Each finished cell is appended to ``--out`` (JSON lines), so an
interrupted run keeps what it measured.

    python benchmarks/reference_table.py --max-eval-windows 16 --out runs/table.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from prunerzero.data import eval_tokens
from prunerzero.models import load_model
from prunerzero.perplexity import perplexity
from prunerzero.pruning.calibration import Calibration, gradients_for
from prunerzero.pruning.masks import Pattern
from prunerzero.pruning.prune import PRUNER_ZERO_TREE, prune_model

METHODS = ["magnitude", "wanda", "sparsegpt", "pruner-zero"]
PATTERNS = ["unstructured", "2:4", "4:8"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--max-eval-windows", type=int, default=None, help="default: the full test split")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--patterns", default=",".join(PATTERNS))
    ap.add_argument("--no-dense", action="store_true")
    ap.add_argument("--out", default="runs/reference_table.jsonl")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    model, tokenizer, source = load_model(args.model, "cuda" if torch.cuda.is_available() else "cpu")
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    calib = Calibration("wikitext2", "validation", args.nsamples, args.seqlen, 0)
    windows = calib.windows(tokenizer)
    tokens = eval_tokens(tokenizer)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []

    def record(row: dict) -> None:
        rows.append(row)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
        logging.info("%s", row)

    if not args.no_dense:
        ppl, n = perplexity(model, tokens, args.seqlen, args.max_eval_windows)
        record({"method": "dense", "pattern": "-", "ppl": ppl, "eval_tokens": n, "prune_seconds": 0.0})
    gradients = None
    for pattern_text in args.patterns.split(","):
        pattern = Pattern.parse(pattern_text)
        sparsity = pattern.n / pattern.m if pattern.structured else 0.5
        for method in args.methods.split(","):
            model.load_state_dict(dense)
            start = time.perf_counter()
            if method == "pruner-zero":
                if gradients is None:
                    gradients = gradients_for(model, source, windows, calib)
                report = prune_model(model, "tree", sparsity, pattern, tree=PRUNER_ZERO_TREE, gradients=gradients)
            else:
                report = prune_model(model, method, sparsity, pattern, windows=windows)
            seconds = time.perf_counter() - start
            ppl, n = perplexity(model, tokens, args.seqlen, args.max_eval_windows)
            record({"method": method, "pattern": str(pattern), "sparsity_actual": report.sparsity_actual,
                    "ppl": ppl, "eval_tokens": n, "prune_seconds": round(seconds, 1)})

    print("| method | pattern | perplexity | prune seconds | eval tokens |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['pattern']} | {r['ppl']:.3f} | {r['prune_seconds']:.1f} | {r['eval_tokens']} |")


if __name__ == "__main__":
    main()
