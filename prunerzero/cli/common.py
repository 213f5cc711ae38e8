"""What several commands share: model, calibration and pruning flags, validated before anything loads."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from prunerzero import files
from prunerzero.choices import CALIBRATED_METHODS, METHODS, OBS_SCOPES, UPDATES, check_allocation, one_of
from prunerzero.data import check_text
from prunerzero.errors import UserError
from prunerzero.models import prunable_linears
from prunerzero.primitives.known import resolve_tree, tree_update
from prunerzero.pruning.allocation import (
    OWL_LAMBDA,
    OWL_M,
    Allocation,
    exact_counts,
    layer_sizes,
    load_allocation,
    owl_for_model,
)
from prunerzero.pruning.calibration import Calibration, gradients_for
from prunerzero.pruning.masks import Pattern, check_sparsity
from prunerzero.pruning.obs import check_update
from prunerzero.pruning.prune import prune_model
from prunerzero.pruning.stats import collect_activation_norms, load_gradients

log = logging.getLogger(__name__)


def metric_list(text: str) -> tuple[str, ...]:
    """Split a comma separated list of metric names or formulas at the commas outside parentheses,
    so ``wanda,mul(W, sqrt(X))`` is two metrics, not three fragments."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch == "(") - (ch == ")")
        if depth < 0:
            raise UserError(f"unbalanced ')' at character {i + 1} of {text!r}; check the formula's parentheses")
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise UserError(f"unbalanced '(' in {text!r}; check the formula's parentheses")
    items.append(text[start:])
    return tuple(s.strip() for s in items if s.strip())


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


def check_outputs(args: argparse.Namespace, file_flags: tuple[str, ...], folder_flag: str | None = None) -> None:
    """Every output the flags name, checked before anything is loaded (the output rule of
    :mod:`prunerzero.files`): files in ``file_flags`` (attribute names), a model folder in ``folder_flag``."""
    named = {f"--{f.replace('_', '-')}": getattr(args, f, None) for f in file_flags}
    for flag, path in named.items():
        if path is not None:
            files.check_output_path(path, flag)
    if folder_flag and getattr(args, folder_flag, None) is not None:
        flag = f"--{folder_flag.replace('_', '-')}"
        files.check_model_folder(getattr(args, folder_flag), flag, force=getattr(args, "force", False))
        named[flag] = getattr(args, folder_flag)
    files.check_distinct(named)


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

    p.add_argument("--method", type=one_of(METHODS, "--method"), metavar="{" + ",".join(METHODS) + "}", required=required)
    p.add_argument("--tree", default=None, help="JSON tree file, formula, or packaged name (pruner-zero)")
    p.add_argument("--sparsity", default=None, help="fraction of weights pruned, in (0, 1); N/M for N:M (default 0.5)")
    p.add_argument("--pattern", default="unstructured", help="unstructured, 2:4 or 4:8")
    p.add_argument("--allocation", default=None,
                   help="layerwise sparsity: uniform, owl, or an allocation JSON file (default: every layer at --sparsity)")
    p.add_argument("--owl-m", type=float, default=OWL_M, help=f"OWL outlier threshold M (default {OWL_M:g})")
    p.add_argument("--owl-lambda", type=float, default=OWL_LAMBDA, help=f"OWL range lambda (default {OWL_LAMBDA:g})")
    p.add_argument("--sparsity-range", default="0,0.99", help="LOW,HIGH: every layer's sparsity stays in it (default 0,0.99)")
    p.add_argument("--save-allocation", default=None, help="write the allocation used as JSON (loadable by --allocation)")
    p.add_argument("--update", type=one_of(UPDATES, "--update"), metavar="{" + ",".join(UPDATES) + "}", default=None,
                   help="obs: SparseGPT's weight update, each block's mask picked by --tree (which may read D = "
                        "1/[H^-1]_jj); default: none, or what a shipped tree file records")
    p.add_argument("--obs-scope", type=one_of(OBS_SCOPES, "--obs-scope"), metavar="{" + ",".join(OBS_SCOPES) + "}",
                   default="block",
                   help="with --update obs: rank a block's scores over the whole block (block, as SparseGPT) or per row")


def check_prune_args(args: argparse.Namespace) -> tuple[Any, float, Any]:
    """Validate the pruning flags before anything is loaded: (pattern, sparsity, tree)."""

    check_text(args.calib_data, None, "--calib-data", args.data_dir)
    pattern = Pattern.parse(args.pattern)
    default = pattern.n / pattern.m if pattern.structured else 0.5
    sparsity = check_sparsity(args.sparsity if args.sparsity is not None else default, pattern)
    tree = resolve_tree(args.tree) if args.tree else None
    if args.method == "tree" and tree is None:
        raise UserError("--method tree needs --tree FILE.json (or --tree pruner-zero for the published metric)")
    if args.method != "tree" and tree is not None:
        raise UserError(f"--tree is only used with --method tree, not {args.method}")
    check_update(update_of(args), args.method, tree)
    if args.gradients and not Path(args.gradients).is_file():
        raise UserError(f"gradient file {args.gradients} does not exist; compute one with `prunerzero gradients`")
    if getattr(args, "allocation", None) is not None:
        check_allocation_args(args, pattern)
    return pattern, sparsity, tree


def update_of(args: argparse.Namespace) -> str:
    """The weight update the flags ask for: --update, else what a shipped tree file records, else none."""
    if getattr(args, "update", None):
        return args.update
    return tree_update(args.tree) if args.method == "tree" and args.tree else "none"


def sparsity_range(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in str(text).split(","))
    except ValueError:
        raise UserError(f"--sparsity-range {text!r} is not LOW,HIGH (e.g. 0.3,0.9)") from None
    if not (0 <= low <= high < 1) or low != low or high != high:
        raise UserError(f"--sparsity-range {text!r} must satisfy 0 <= LOW <= HIGH < 1")
    return low, high


def check_allocation_args(args: argparse.Namespace, pattern: Pattern) -> None:
    check_allocation(args.allocation, pattern.structured, "--allocation")
    sparsity_range(args.sparsity_range)
    if not (0 <= args.owl_lambda < 1) or not args.owl_m > 0:
        raise UserError(f"--owl-lambda must be in [0, 1) and --owl-m positive, got {args.owl_lambda} and {args.owl_m}")


def prune_from_args(args: argparse.Namespace, model, tokenizer, source):
    """Prune per the flags; returns the report."""

    pattern, sparsity, tree = check_prune_args(args)
    allocation_spec = getattr(args, "allocation", None)
    needs_calib = (args.method in CALIBRATED_METHODS or (tree is not None and tree.terminals & {"X", "G"})
                   or allocation_spec == "owl" or update_of(args) == "obs")
    calib = Calibration(args.calib_data, None, args.nsamples, args.seqlen, args.seed, args.data_dir)
    windows = calib.windows(tokenizer) if needs_calib else None
    gradients = None
    if tree is not None and "G" in tree.terminals:
        gradients = load_gradients(args.gradients, model) if args.gradients else gradients_for(model, source, windows, calib, args.cache_dir)
    allocation, extra = None, {}
    if allocation_spec is not None:
        allocation, extra = make_allocation(args, model, windows, sparsity)
    report = prune_model(model, args.method, sparsity, pattern, windows=windows, tree=tree, gradients=gradients,
                         allocation=allocation, update=update_of(args), obs_scope=getattr(args, "obs_scope", "block"))
    if allocation is not None:
        report.allocation = {**allocation.to_json(sparsity), **extra}
        if args.save_allocation:
            files.write_json(args.save_allocation, report.allocation)
    return report


def make_allocation(args: argparse.Namespace, model: Any, windows: Any, sparsity: float) -> tuple[Allocation, dict]:
    """The allocation the flags ask for, with what explains it (OWL's outlier ratios)."""
    low, high = sparsity_range(args.sparsity_range)
    names = list(prunable_linears(model))
    sizes = layer_sizes(model, names)
    if args.allocation == "uniform":
        return exact_counts({n: sparsity for n in names}, sizes, sparsity, low, high, "uniform"), {}
    if args.allocation == "owl":
        activations = collect_activation_norms(model, windows)  # the dense model's X, as OWL computes it
        allocation, outliers = owl_for_model(model, activations, sparsity, args.owl_m, args.owl_lambda, low, high)
        return allocation, {"owl": {"m": args.owl_m, "lambda": args.owl_lambda, "block_outlier_ratios": outliers}}
    return load_allocation(args.allocation, sizes, sparsity, low, high), {}


def save_model(model, tokenizer, folder: str, what: str = "pruned model") -> None:
    """Save a model and its tokenizer into ``folder`` (checked by :func:`check_outputs` beforehand);
    an OS error (full disk, no permission) is one line."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    except OSError as e:
        raise files.write_error(folder, e) from None
    log.info("saved the %s to %s", what, folder)


