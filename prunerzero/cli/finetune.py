"""``prunerzero finetune``: LoRA recovery of a pruned model, zeros kept."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from prunerzero.cli.common import check_outputs, positive_int, save_model, write_json
from prunerzero.data import eval_tokens
from prunerzero.models import load_model, pick_device
from prunerzero.perplexity import perplexity, window_count
from prunerzero.recovery.lora import (
    LoraSettings,
    base_sparsity,
    finetune_lora,
    merge_and_remask,
    tail_mean,
)

log = logging.getLogger(__name__)

def settings_from_args(args: argparse.Namespace) -> LoraSettings:
    """Defaults < ``--config`` YAML < flags."""
    settings = LoraSettings.from_yaml(args.config) if args.config else LoraSettings()
    flags = {"rank": args.rank, "alpha": args.alpha, "dropout": args.dropout, "targets": args.targets,
             "steps": args.steps, "lr": args.lr, "seqlen": args.seqlen, "batch_size": args.batch_size,
             "seed": args.seed, "data": args.data, "eval_windows": args.max_eval_windows}
    return settings.updated(flags, origin="flags")


def _evaluate(model: nn.Module, tokens: torch.Tensor, seqlen: int, windows: int | None, label: str) -> float:
    ppl, _ = perplexity(model, tokens, seqlen, windows)
    log.info("%s: wikitext2 test perplexity %.4f", label, ppl)
    return ppl


def cmd_finetune(args: argparse.Namespace) -> None:
    settings = settings_from_args(args)
    check_outputs(args, ("json",), "save")
    model, tokenizer, _source = load_model(args.model, pick_device(args.device))
    tokens = eval_tokens(tokenizer, data_dir=args.data_dir)
    result: dict[str, Any] = {"model": args.model, "settings": asdict(settings), "eval_data": "wikitext2:test",
                              "eval_seqlen": args.eval_seqlen,
                              "eval_tokens": window_count(tokens.numel(), args.eval_seqlen, settings.eval_windows) * args.eval_seqlen}
    result["sparsity_before"] = base_sparsity(model)
    result["ppl_before"] = _evaluate(model, tokens, args.eval_seqlen, settings.eval_windows, "before fine-tuning")
    run = finetune_lora(model, tokenizer, settings, windows=None, data_dir=args.data_dir)
    peft_model = run["peft_model"]
    result.update(steps=run["steps"], train_tokens=run["tokens"], train_seconds=round(run["seconds"], 1),
                  trainable_parameters=run["trainable_parameters"], loss_first=run["losses"][0],
                  loss_last10=tail_mean(run["losses"]))
    result["sparsity_after"] = base_sparsity(peft_model)
    result["ppl_after"] = _evaluate(peft_model, tokens, args.eval_seqlen, settings.eval_windows, "after fine-tuning (unmerged)")
    if args.merge:
        merged = merge_and_remask(peft_model)
        result["sparsity_after_merge"] = base_sparsity(merged)
        result["ppl_after_merge"] = _evaluate(merged, tokens, args.eval_seqlen, settings.eval_windows, "after merge and remask")
        if args.save:
            save_model(merged, tokenizer, args.save, "merged, re-masked model")
    elif args.save:
        save_model(peft_model, tokenizer, args.save, "LoRA adapter")
    result["losses"] = run["losses"]
    write_json(args.json, result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("losses", "settings")}))


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("finetune", help="LoRA fine-tune a pruned model, keeping its zeros; perplexity before/after")
    p.add_argument("--model", required=True, help="pruned model folder (or any model prunerzero can load)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    p.add_argument("--data-dir", default=None, help="folder with wikitext-2/, c4/ (else $PRUNERZERO_DATA, ../shared/data, hub)")
    p.add_argument("--config", default=None, help="YAML file of LoRA settings (flags override it)")
    p.add_argument("--rank", type=positive_int, default=None, help="LoRA rank (default 8)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 16)")
    p.add_argument("--dropout", type=float, default=None, help="LoRA dropout (default 0.05)")
    p.add_argument("--targets", default=None, help="modules to adapt, comma separated (default all attention and MLP projections)")
    p.add_argument("--steps", type=positive_int, default=None, help="optimizer steps (default 100)")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 1e-4)")
    p.add_argument("--seqlen", type=positive_int, default=None, help="tokens per training window (default 512)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="windows per step (default 1)")
    p.add_argument("--seed", type=int, default=None, help="seed of the windows and the adapters (default 0)")
    p.add_argument("--data", default=None, help="training text: wikitext2 (validation split, default), c4 or a text file")
    p.add_argument("--max-eval-windows", type=positive_int, default=None, help="evaluate only the first W test windows")
    p.add_argument("--eval-seqlen", type=positive_int, default=2048, help="tokens per evaluation window (default 2048)")
    p.add_argument("--merge", action="store_true", help="merge the adapters and re-apply the zero masks")
    p.add_argument("--save", default=None, help="folder: the merged model with --merge, else the adapter")
    p.add_argument("--force", action="store_true", help="let --save write into an existing, non-empty folder")
    p.add_argument("--json", default=None, help="write the results (with the loss log) as JSON to this file")
    p.set_defaults(func=cmd_finetune)
