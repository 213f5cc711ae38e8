"""Calibration settings and the statistics derived from them, shared by the CLI and the search."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from prunerzero.data import calibration_windows, default_split
from prunerzero.models import ModelSource, cache_dir
from prunerzero.pruning.stats import cached_gradients


@dataclass(frozen=True)
class Calibration:
    """Which windows calibrate the statistics: source (wikitext2, c4 or a text file), split,
    number of windows, their length and the seed that draws them."""

    source: str = "wikitext2"
    split: str | None = None
    nsamples: int = 32
    seqlen: int = 2048
    seed: int = 0
    data_dir: str | None = None

    def windows(self, tokenizer: object) -> torch.Tensor:
        return calibration_windows(tokenizer, self.source, self.nsamples, self.seqlen, self.seed, self.split, self.data_dir)

    def draw(self) -> tuple[str, str | None, int, int, int]:
        """(source, split, nsamples, seqlen, seed): what decides which windows are drawn."""
        return (self.source, self.split, self.nsamples, self.seqlen, self.seed)

    def key(self) -> dict[str, object]:
        d = asdict(self)
        d.pop("data_dir")
        return d

    def statistics_key(self) -> dict[str, object]:
        """``key()`` with the split spelled out, for the names of statistics files: a config that
        writes ``split: validation`` and a command that leaves the default draw the same windows,
        so they must find the same X and G."""
        return {**self.key(), "split": self.split or default_split(self.source)}


def gradients_for(
    model: nn.Module, source: ModelSource, windows: torch.Tensor, calib: Calibration, folder: str | Path | None = None
) -> dict[str, torch.Tensor]:
    """G for this model and calibration, from the cache folder or computed once and stored there.

    ``folder`` (a run folder) keeps its own copy, and the user's cache (``cache_dir()/gradients``)
    is read and filled too: G for one model and calibration is computed once for all runs,
    re-scores and ``prunerzero prune`` calls (at 32 x 2048 tokens that is ten minutes on a CPU)."""
    shared = cache_dir() / "gradients"
    folder = Path(folder) if folder else shared
    also = None if folder.resolve() == shared.resolve() else shared
    return cached_gradients(model, windows, folder, {"model": source.fingerprint, **calib.statistics_key()}, also=also)
