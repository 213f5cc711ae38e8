"""Calibration settings and the statistics derived from them, shared by the CLI and the search."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from prunerzero.data import calibration_windows
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

    def key(self) -> dict[str, object]:
        d = asdict(self)
        d.pop("data_dir")
        return d


def gradients_for(
    model: nn.Module, source: ModelSource, windows: torch.Tensor, calib: Calibration, folder: str | Path | None = None
) -> dict[str, torch.Tensor]:
    """G for this model and calibration, from the cache folder or computed once and stored there."""
    folder = Path(folder) if folder else cache_dir() / "gradients"
    return cached_gradients(model, windows, folder, {"model": source.fingerprint, **calib.key()})
