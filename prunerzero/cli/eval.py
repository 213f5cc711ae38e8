"""``prunerzero eval``: perplexity and zero-shot accuracy of a (pruned) model."""

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
    write_json,
)
from prunerzero.data import eval_tokens
from prunerzero.evaluation.zeroshot import check_tasks, evaluate_zeroshot, format_table
from prunerzero.models import load_model, pick_device
from prunerzero.perplexity import perplexity
from prunerzero.pruning.prune import layer_sparsity_total, measure_sparsity

log = logging.getLogger(__name__)


def cmd_eval(args: argparse.Namespace) -> None:
    if args.tasks:
        check_tasks(args.tasks.split(","), args.data_dir)
    if args.method:
        check_prune_args(args)
    check_outputs(args, ("json", "save_allocation"))
    model, tokenizer, source = load_model(args.model, pick_device(args.device))
    result: dict[str, Any] = {"model": args.model}
    if args.method:
        report = prune_from_args(args, model, tokenizer, source)
        result.update(method=report.method, tree=args.tree, pattern=report.pattern,
                      sparsity_target=report.sparsity_target, prune_seconds=round(report.seconds, 3))
    result["sparsity_actual"] = layer_sparsity_total(measure_sparsity(model))
    if not args.no_ppl:
        ppl, n = perplexity(model, eval_tokens(tokenizer, data_dir=args.data_dir), args.seqlen, args.max_eval_windows)
        result.update(ppl=ppl, eval_tokens=n)
    if args.tasks:

        zs = evaluate_zeroshot(model, tokenizer, args.tasks.split(","), limit=args.limit, data_dir=args.data_dir,
                               batch_size=args.batch_size)
        result["zeroshot"] = zs
        print(format_table(zs))
    write_json(args.json, result)
    print(json.dumps({k: v for k, v in result.items() if k != "zeroshot"}))


def register(sub: Any) -> None:
    p = sub.add_parser("eval", help="perplexity and zero-shot accuracy of a (pruned) model")
    add_model_args(p)
    add_prune_args(p, required=False)
    add_calibration_args(p)
    p.add_argument("--max-eval-windows", type=positive_int, default=None)
    p.add_argument("--no-ppl", action="store_true", help="skip perplexity")
    p.add_argument("--tasks", default=None, help="zero-shot tasks, comma separated (boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa)")
    p.add_argument("--limit", type=positive_int, default=None, help="examples per task")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--json", default=None)
    p.set_defaults(func=cmd_eval)
