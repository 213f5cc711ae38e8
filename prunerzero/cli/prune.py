"""``prunerzero prune``: prune a model with a method or tree, measure perplexity, save it."""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from prunerzero.cli.common import (
    add_calibration_args,
    add_model_args,
    add_prune_args,
    check_outputs,
    check_prune_args,
    positive_int,
    prune_from_args,
    save_model,
    write_json,
)
from prunerzero.data import eval_tokens
from prunerzero.errors import UserError
from prunerzero.models import load_model, pick_device
from prunerzero.perplexity import perplexity

log = logging.getLogger(__name__)


def cmd_prune(args: argparse.Namespace) -> None:
    check_prune_args(args)
    check_outputs(args, ("json", "save_allocation"), "save_model")
    model, tokenizer, source = load_model(args.model, pick_device(args.device))
    tokens = None
    if not args.no_eval:  # checked before pruning: a text too short for one window fails at once
        tokens = eval_tokens(tokenizer, data_dir=args.data_dir)
        if tokens.numel() < args.seqlen:
            raise UserError(f"the evaluation text has {tokens.numel()} tokens, fewer than one window of "
                            f"--seqlen {args.seqlen}")
    report = prune_from_args(args, model, tokenizer, source)
    result: dict[str, Any] = {
        "model": args.model, "method": report.method, "tree": args.tree, "pattern": report.pattern,
        "sparsity_target": report.sparsity_target, "sparsity_actual": report.sparsity_actual,
        "prune_seconds": round(report.seconds, 3), "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed,
        "calib_data": args.calib_data,
    }
    if tokens is not None:
        ppl, n = perplexity(model, tokens, args.seqlen, args.max_eval_windows)
        result.update(ppl=ppl, eval_tokens=n, eval_data="wikitext2:test")
        log.info("wikitext2 test perplexity %.4f (%d tokens)", ppl, n)
    if report.allocation is not None:
        result["allocation"] = report.allocation
        result["pruned_weights"] = sum(z for z, _ in report.layer_sparsity_counts.values())
    result["layer_sparsity"] = report.layer_sparsity
    if args.save_model:
        save_model(model, tokenizer, args.save_model)
    write_json(args.json, result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("layer_sparsity", "allocation")}))


def register(sub: Any) -> None:
    p = sub.add_parser("prune", help="prune a model with a method or tree, measure perplexity, save it")
    add_model_args(p)
    add_prune_args(p)
    add_calibration_args(p)
    p.add_argument("--max-eval-windows", type=positive_int, default=None, help="evaluate only the first W test windows")
    p.add_argument("--no-eval", action="store_true", help="skip the perplexity evaluation")
    p.add_argument("--save-model", default=None, help="folder to save the pruned model and tokenizer")
    p.add_argument("--json", default=None, help="write the results as JSON to this file")
    p.add_argument("--force", action="store_true", help="let --save-model write into an existing, non-empty folder")
    p.set_defaults(func=cmd_prune)
