"""Command line: ``prunerzero prune | gradients | eval | search | export | report | finetune``.

Every problem with the user's input is a :class:`UserError`, printed as one line (no traceback)
with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from prunerzero import files
from prunerzero.errors import UserError

log = logging.getLogger("prunerzero")

from prunerzero.primitives.known import resolve_tree  # noqa: F401  (re-exported for the sub-command modules)


from prunerzero.pruning.models import pick_device  # noqa: E402,F401


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be at least 1")
    return v


def write_json(path: str | None, data: dict[str, Any]) -> None:
    if path:
        files.write_json(path, data)
        log.info("wrote %s", path)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="hub id, local folder, .gguf file or smollm2-135m (default)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    p.add_argument("--data-dir", default=None, help="folder with wikitext-2/, c4/, zeroshot/ (else $PRUNERZERO_DATA, ../shared/data, hub)")


def add_calibration_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib-data", default="wikitext2", help="wikitext2 (validation split), c4 (train) or a text file")
    p.add_argument("--nsamples", type=positive_int, default=32, help="calibration windows (default 32)")
    p.add_argument("--seqlen", type=positive_int, default=2048, help="tokens per window (default 2048)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows (default 0)")
    p.add_argument("--gradients", default=None, help="gradient file (safetensors, or the reference .pth); else computed and cached")
    p.add_argument("--cache-dir", default=None, help="gradient cache folder (default ~/.cache/prunerzero/gradients)")


def add_prune_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    from prunerzero.pruning.prune import METHODS

    p.add_argument("--method", choices=METHODS, required=required)
    p.add_argument("--tree", default=None, help="JSON tree file, formula, or packaged name (pruner-zero)")
    p.add_argument("--sparsity", default=None, help="fraction of weights pruned, in (0, 1); N/M for N:M (default 0.5)")
    p.add_argument("--pattern", default="unstructured", help="unstructured, 2:4 or 4:8")


def check_prune_args(args: argparse.Namespace) -> tuple[Any, float, Any]:
    """Validate the pruning flags before anything is loaded: (pattern, sparsity, tree)."""
    from prunerzero.pruning.masks import Pattern, check_sparsity

    pattern = Pattern.parse(args.pattern)
    default = pattern.n / pattern.m if pattern.structured else 0.5
    sparsity = check_sparsity(args.sparsity if args.sparsity is not None else default, pattern)
    tree = resolve_tree(args.tree) if args.tree else None
    if args.method == "tree" and tree is None:
        raise UserError("--method tree needs --tree FILE.json (or --tree pruner-zero for the published metric)")
    if args.method != "tree" and tree is not None:
        raise UserError(f"--tree is only used with --method tree, not {args.method}")
    if args.gradients and not Path(args.gradients).is_file():
        raise UserError(f"gradient file {args.gradients} does not exist; compute one with `prunerzero gradients`")
    return pattern, sparsity, tree


def prune_from_args(args: argparse.Namespace, model, tokenizer, source):
    """Prune per the flags; returns the report."""
    from prunerzero.pruning.calibration import Calibration, gradients_for
    from prunerzero.pruning.prune import prune_model
    from prunerzero.pruning.stats import load_gradients

    pattern, sparsity, tree = check_prune_args(args)
    needs_calib = args.method in ("wanda", "sparsegpt") or (tree is not None and tree.terminals & {"X", "G"})
    calib = Calibration(args.calib_data, None, args.nsamples, args.seqlen, args.seed, args.data_dir)
    windows = calib.windows(tokenizer) if needs_calib else None
    gradients = None
    if tree is not None and "G" in tree.terminals:
        gradients = load_gradients(args.gradients, model) if args.gradients else gradients_for(model, source, windows, calib, args.cache_dir)
    return prune_model(model, args.method, sparsity, pattern, windows=windows, tree=tree, gradients=gradients)


def cmd_prune(args: argparse.Namespace) -> None:
    from prunerzero.pruning.data import eval_tokens
    from prunerzero.pruning.models import load_model
    from prunerzero.pruning.perplexity import perplexity

    check_prune_args(args)
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
    result["layer_sparsity"] = report.layer_sparsity
    if args.save_model:
        save_model(model, tokenizer, args.save_model)
    write_json(args.json, result)
    print(json.dumps({k: v for k, v in result.items() if k != "layer_sparsity"}))


def save_model(model, tokenizer, folder: str) -> None:
    Path(folder).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    log.info("saved pruned model to %s", folder)


def cmd_gradients(args: argparse.Namespace) -> None:
    from prunerzero.pruning.calibration import Calibration
    from prunerzero.pruning.models import load_model
    from prunerzero.pruning.stats import compute_gradients, save_tensors_atomic

    model, tokenizer, source = load_model(args.model, pick_device(args.device))
    calib = Calibration(args.calib_data, None, args.nsamples, args.seqlen, args.seed, args.data_dir)
    grads = compute_gradients(model, calib.windows(tokenizer))
    save_tensors_atomic(grads, Path(args.out), metadata={"model": args.model, **{k: str(v) for k, v in calib.key().items()}})
    log.info("wrote %d gradient tensors to %s", len(grads), args.out)


def cmd_eval(args: argparse.Namespace) -> None:
    from prunerzero.pruning.data import eval_tokens
    from prunerzero.pruning.models import load_model
    from prunerzero.pruning.perplexity import perplexity
    from prunerzero.pruning.prune import measure_sparsity, layer_sparsity_total

    if args.tasks:
        from prunerzero.pruning.zeroshot import check_tasks

        check_tasks(args.tasks.split(","), args.data_dir)
    if args.method:
        check_prune_args(args)
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
        from prunerzero.pruning.zeroshot import evaluate_zeroshot, format_table

        zs = evaluate_zeroshot(model, tokenizer, args.tasks.split(","), limit=args.limit, data_dir=args.data_dir,
                               batch_size=args.batch_size)
        result["zeroshot"] = zs
        print(format_table(zs))
    write_json(args.json, result)
    print(json.dumps({k: v for k, v in result.items() if k != "zeroshot"}))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunerzero", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a model with a method or tree, measure perplexity, save it")
    add_model_args(p)
    add_prune_args(p)
    add_calibration_args(p)
    p.add_argument("--max-eval-windows", type=positive_int, default=None, help="evaluate only the first W test windows")
    p.add_argument("--no-eval", action="store_true", help="skip the perplexity evaluation")
    p.add_argument("--save-model", default=None, help="folder to save the pruned model and tokenizer")
    p.add_argument("--json", default=None, help="write the results as JSON to this file")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("gradients", help="compute the gradient statistic G and save it (safetensors)")
    add_model_args(p)
    add_calibration_args(p)
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.set_defaults(func=cmd_gradients)

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

    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


# Modules that add their own sub-commands with a `register(subparsers)` function.
COMMAND_MODULES: list[str] = ["prunerzero.search.commands", "prunerzero.pruning.finetune", "prunerzero.report"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "datasets", "urllib3", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args.func(args)
    except UserError as e:
        print(f"prunerzero: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prunerzero: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
