"""Perplexity by the protocol of the Wanda / SparseGPT / Pruner-Zero code.

Non-overlapping windows of ``seqlen`` tokens (the tail shorter than a window is dropped), the
mean next-token cross-entropy of each window, averaged over windows, exponentiated; float32.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedModel

from prunerzero.errors import UserError
from prunerzero.models import model_device

log = logging.getLogger(__name__)


def window_count(n_tokens: int, seqlen: int, max_windows: int | None = None) -> int:
    n = n_tokens // seqlen
    return n if max_windows is None else min(n, max_windows)


def perplexity_of(losses: Sequence[float]) -> float:
    """The perplexity of windows with these mean losses (the protocol: the mean loss, exponentiated)."""
    return float(np.exp(np.mean(losses)))


@torch.no_grad()
def window_losses(
    model: nn.Module, tokens: torch.Tensor, seqlen: int, max_windows: int | None = None, progress: bool = True,
    windows_per_forward: int = 1,
) -> list[float]:
    """Mean next-token loss of each of the first ``max_windows`` windows.

    ``windows_per_forward`` > 1 runs that many windows as one batch: the same losses (each window
    is still its own sequence), fewer and larger matrix products, and a masked model swaps its
    masks in once per batch instead of once per window."""
    n = window_count(tokens.numel(), seqlen, max_windows)
    if n < 1:
        raise UserError(f"the evaluation text has {tokens.numel()} tokens, fewer than one window of {seqlen}")
    device = model_device(model)
    losses: list[float] = []
    step = max(1, windows_per_forward)
    with tqdm(total=n, desc="perplexity", unit="window", disable=not progress) as bar:
        for first in range(0, n, step):
            count = min(step, n - first)
            ids = tokens[first * seqlen : (first + count) * seqlen].reshape(count, seqlen).to(device)
            losses += batch_losses(model, ids)
            bar.update(count)
    return losses


# Architectures whose logits are exactly lm_head(last hidden state), with no scaling or capping.
PLAIN_HEAD_TYPES = {"llama", "mistral", "qwen2", "qwen3"}
LOSS_CHUNK = 128  # positions per lm_head slice


def batch_losses(model: nn.Module, ids: torch.Tensor) -> list[float]:
    """Mean next-token cross-entropy of each row of ``ids`` (windows, seqlen).

    The logits of a whole window (seqlen x vocab floats, 400 MB for LLaMA-2 at 2048 tokens) are
    the largest buffer of an evaluation, so for plain-head architectures the head and the loss run
    on slices of LOSS_CHUNK positions; other models take the ordinary full-logits path."""
    plain = isinstance(model, PreTrainedModel) and model.config.model_type in PLAIN_HEAD_TYPES  # (not a PEFT wrapper)
    if not plain:
        logits = model(input_ids=ids, use_cache=False).logits.float()
        return [float(F.cross_entropy(logits[i, :-1], ids[i, 1:])) for i in range(len(ids))]
    hidden_all = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
    head = model.get_output_embeddings()
    out = []
    for hidden, row in zip(hidden_all[:, :-1], ids):
        targets = row[1:]
        total = torch.zeros((), dtype=torch.float64, device=ids.device)
        for start in range(0, targets.numel(), LOSS_CHUNK):
            logits = head(hidden[start : start + LOSS_CHUNK]).float()
            total += F.cross_entropy(logits, targets[start : start + LOSS_CHUNK], reduction="sum").double()
        out.append(float(total / targets.numel()))
    return out


def window_loss(model: nn.Module, ids: torch.Tensor) -> float:
    """Mean next-token cross-entropy of one window (``ids`` of shape (1, seqlen))."""
    return batch_losses(model, ids)[0]


def perplexity(
    model: nn.Module, tokens: torch.Tensor, seqlen: int, max_windows: int | None = None, progress: bool = True
) -> tuple[float, int]:
    """(perplexity, number of tokens evaluated)."""
    start = time.perf_counter()
    losses = window_losses(model, tokens, seqlen, max_windows, progress)
    ppl = math.exp(sum(losses) / len(losses))
    log.info("perplexity %.4f over %d windows of %d tokens (%.1f s)", ppl, len(losses), seqlen, time.perf_counter() - start)
    return ppl, len(losses) * seqlen
