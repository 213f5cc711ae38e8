"""``prunerzero gradients``: compute the gradient statistic G and save it (safetensors)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from prunerzero.cli.common import add_calibration_args, add_model_args, check_outputs
from prunerzero.data import check_text
from prunerzero.models import load_model, pick_device
from prunerzero.pruning.calibration import Calibration
from prunerzero.pruning.stats import compute_gradients, save_tensors_atomic

log = logging.getLogger(__name__)


def cmd_gradients(args: argparse.Namespace) -> None:
    check_outputs(args, ("out",))
    check_text(args.calib_data, None, "--calib-data", args.data_dir)
    model, tokenizer, source = load_model(args.model, pick_device(args.device))
    calib = Calibration(args.calib_data, None, args.nsamples, args.seqlen, args.seed, args.data_dir)
    grads = compute_gradients(model, calib.windows(tokenizer))
    save_tensors_atomic(grads, Path(args.out), metadata={"model": args.model, **{k: str(v) for k, v in calib.statistics_key().items()}})
    log.info("wrote %d gradient tensors to %s", len(grads), args.out)


def register(sub: Any) -> None:
    p = sub.add_parser("gradients", help="compute the gradient statistic G and save it (safetensors)")
    add_model_args(p)
    add_calibration_args(p)
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.set_defaults(func=cmd_gradients)
