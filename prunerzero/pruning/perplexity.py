"""Perplexity by the protocol of the Wanda / SparseGPT / Pruner-Zero code.

Non-overlapping windows of ``seqlen`` tokens (the tail shorter than a window is dropped), the
mean next-token cross-entropy of each window, averaged over windows, exponentiated; float32.
"""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from prunerzero.errors import UserError
from prunerzero.pruning.models import model_device

log = logging.getLogger(__name__)


def window_count(n_tokens: int, seqlen: int, max_windows: int | None = None) -> int:
    n = n_tokens // seqlen
    return n if max_windows is None else min(n, max_windows)


@torch.no_grad()
def window_losses(
    model: nn.Module, tokens: torch.Tensor, seqlen: int, max_windows: int | None = None, progress: bool = True
) -> list[float]:
    """Mean next-token loss of each of the first ``max_windows`` windows."""
    n = window_count(tokens.numel(), seqlen, max_windows)
    if n < 1:
        raise UserError(f"the evaluation text has {tokens.numel()} tokens, fewer than one window of {seqlen}")
    device = model_device(model)
    losses = []
    for i in tqdm(range(n), desc="perplexity", unit="window", disable=not progress):
        ids = tokens[i * seqlen : (i + 1) * seqlen].unsqueeze(0).to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        loss = F.cross_entropy(logits[0, :-1], ids[0, 1:])
        losses.append(float(loss))
    return losses


def perplexity(
    model: nn.Module, tokens: torch.Tensor, seqlen: int, max_windows: int | None = None, progress: bool = True
) -> tuple[float, int]:
    """(perplexity, number of tokens evaluated)."""
    start = time.perf_counter()
    losses = window_losses(model, tokens, seqlen, max_windows, progress)
    ppl = math.exp(sum(losses) / len(losses))
    log.info("perplexity %.4f over %d windows of %d tokens (%.1f s)", ppl, len(losses), seqlen, time.perf_counter() - start)
    return ppl, len(losses) * seqlen
