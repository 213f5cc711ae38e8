"""Layerwise sparsity: how many weights each layer gives up, between scoring and masking.

An *allocation* maps every prunable linear layer to the number of weights it prunes. The total is
exactly ``round(target * all prunable weights)``, every layer's ratio stays within a configured
range, and inside a layer the count is spread over the output rows as evenly as it can be (the
first ``count % rows`` rows prune one weight more), so each row still ranks its own weights, as
Wanda's comparison group does.

- ``uniform``: every layer at the target (up to the rounding that makes the total exact).
- ``owl`` (Yin et al., "Outlier Weighed Layerwise sparsity", ICML 2024): per decoder block, the
  share of Wanda scores above ``M`` times the block's mean score (in %) is min-max scaled to
  ``[0, 2 * lambda]``, centred, and subtracted from the target: blocks with more outliers keep
  more weights. The paper's defaults: M = 5, lambda = 0.08. Scores are those of the dense model.
- a JSON file (``prunerzero-allocation``): per-layer ratios written by a user or a search.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from prunerzero.errors import UserError
from prunerzero.files import read_json
from prunerzero.models import decoder_layers, linear_layers

OWL_M = 5.0
OWL_LAMBDA = 0.08
FORMAT = "prunerzero-allocation"


@dataclass(frozen=True)
class Allocation:
    """Weights pruned per layer (exact counts), and the ratios they came from."""

    counts: dict[str, int]
    sizes: dict[str, int]
    method: str

    @property
    def ratios(self) -> dict[str, float]:
        return {n: self.counts[n] / self.sizes[n] for n in self.counts}

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_json(self, target: float) -> dict:
        return {"format": FORMAT, "method": self.method, "target": target, "pruned_weights": self.total,
                "weights": sum(self.sizes.values()), "layers": self.ratios}


def _fit_range(ratios: np.ndarray, sizes: np.ndarray, target: float, low: float, high: float) -> np.ndarray:
    """Shift the ratios (water-filling) so their size-weighted mean is the target, each in [low, high]."""
    if not low <= target <= high:
        raise UserError(f"the sparsity range [{low:g}, {high:g}] cannot reach the target {target:g}; widen it")
    if not np.isfinite(ratios).all():
        raise UserError("the per-layer sparsities are not all finite numbers (NaN or Inf in the features)")
    lo, hi = low - ratios.max() - 1.0, high - ratios.min() + 1.0
    for _ in range(200):  # bisection on the shift: the clipped mean is monotone in it
        mid = (lo + hi) / 2
        mean = float((np.clip(ratios + mid, low, high) * sizes).sum() / sizes.sum())
        lo, hi = (mid, hi) if mean < target else (lo, mid)
    return np.clip(ratios + (lo + hi) / 2, low, high)


def exact_counts(ratios: Mapping[str, float], sizes: Mapping[str, int], target: float,
                 low: float = 0.0, high: float = 0.99, method: str = "custom") -> Allocation:
    """Counts per layer within [low, high] whose total is exactly round(target * all weights)."""
    names = list(sizes)
    missing = [n for n in names if n not in ratios]
    extra = [n for n in ratios if n not in sizes]
    if missing or extra:
        raise UserError(f"the allocation does not fit this model: {len(missing)} layer(s) missing "
                        f"({', '.join(missing[:3])}{'...' if len(missing) > 3 else ''}), {len(extra)} unknown "
                        f"({', '.join(extra[:3])}{'...' if len(extra) > 3 else ''}); the model has {len(names)}")
    r = np.array([float(ratios[n]) for n in names])
    s = np.array([sizes[n] for n in names], dtype=np.float64)
    fitted = _fit_range(r, s, target, low, high)
    want = fitted * s
    counts = np.floor(want).astype(np.int64)
    goal = round(target * s.sum())
    # largest remainders first, never past a layer's upper bound
    order = np.argsort(-(want - counts), kind="stable")
    cap = np.floor(high * s).astype(np.int64)
    i = 0
    while counts.sum() < goal and i < 10 * len(order):
        j = order[i % len(order)]
        if counts[j] < cap[j]:
            counts[j] += 1
        i += 1
    floor = np.ceil(low * s).astype(np.int64)
    while counts.sum() > goal:  # the lowest remainders give back, never past a layer's lower bound
        j = int(np.argmax(counts - floor))
        if counts[j] <= floor[j]:
            break
        counts[j] -= 1
    if counts.sum() != goal:
        raise UserError(f"cannot prune exactly {goal} weights within [{low:g}, {high:g}] per layer; widen the range")
    return Allocation({n: int(c) for n, c in zip(names, counts)}, dict(sizes), method)


def uniform(sizes: Mapping[str, int], target: float) -> Allocation:
    return exact_counts({n: target for n in sizes}, sizes, target, 0.0, 1.0, "uniform")


def outlier_ratio(scores: Sequence[torch.Tensor], m: float = OWL_M) -> float:
    """Share (in %) of a block's scores above m times their mean (OWL's layerwise outlier distribution)."""
    flat = torch.cat([s.flatten().float() for s in scores])
    return float((flat > m * flat.mean()).float().mean()) * 100


def owl_ratios(block_outliers: Sequence[float], target: float, lam: float = OWL_LAMBDA) -> list[float]:
    """Per-block sparsity from per-block outlier ratios, as the OWL paper maps them."""
    r = np.asarray(block_outliers, dtype=np.float64)
    if not np.isfinite(r).all():
        raise UserError("OWL: an outlier ratio is not a finite number")
    span = r.max() - r.min()
    density = np.zeros_like(r) if span == 0 else (r - r.min()) / span * (2 * lam)
    density = density - density.mean() + (1 - target)
    return list(1 - density)


def owl(block_scores: Sequence[Mapping[str, torch.Tensor]], sizes: Mapping[str, int], target: float,
        m: float = OWL_M, lam: float = OWL_LAMBDA, low: float = 0.0, high: float = 0.99) -> tuple[Allocation, list[float]]:
    """OWL from the dense model's Wanda scores, one mapping (layer name -> scores) per block."""
    if not 0 <= lam < 1 or m <= 0:
        raise UserError(f"OWL needs 0 <= lambda < 1 and M > 0, got lambda {lam}, M {m}")
    outliers = [outlier_ratio(list(block.values()), m) for block in block_scores]
    per_block = owl_ratios(outliers, target, lam)
    ratios = {name: per_block[b] for b, block in enumerate(block_scores) for name in block}
    return exact_counts(ratios, sizes, target, low, high, "owl"), outliers


def load_allocation(path: str | Path, sizes: Mapping[str, int], target: float, low: float = 0.0,
                    high: float = 0.99) -> Allocation:
    """An allocation file: ``{"format": "prunerzero-allocation", "layers": {name: ratio}}``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"allocation file {path} does not exist (or is not a file)")
    data = read_json(path, "allocation file")
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("layers"), dict):
        raise UserError(f"allocation file {path} is not a {FORMAT} file ({{\"format\": \"{FORMAT}\", \"layers\": ...}})")
    layers = data["layers"]
    bad = [n for n, v in layers.items() if not isinstance(v, (int, float)) or isinstance(v, bool)
           or not math.isfinite(v) or not 0 <= v < 1]
    if bad:
        raise UserError(f"allocation file {path}: ratio of {bad[0]} is {layers[bad[0]]!r}, not a number in [0, 1)")
    if len(layers) != len(sizes):
        raise UserError(f"allocation file {path} has {len(layers)} layers, the model has {len(sizes)}: "
                        "it was written for another model")
    return exact_counts(layers, sizes, target, low, high, f"file:{path.name}")


def layer_sizes(model: torch.nn.Module, names: Sequence[str]) -> dict[str, int]:
    modules = dict(model.named_modules())
    return {n: modules[n].weight.numel() for n in names}


def owl_for_model(model: torch.nn.Module, activations: Mapping[str, torch.Tensor], target: float,
                  m: float = OWL_M, lam: float = OWL_LAMBDA, low: float = 0.0,
                  high: float = 0.99) -> tuple[Allocation, list[float]]:
    """OWL on a model: Wanda scores |W| * sqrt(X) of its dense weights, grouped by decoder block."""
    names = {id(mod): n for n, mod in model.named_modules()}
    blocks = []
    with torch.no_grad():
        for block in decoder_layers(model):
            blocks.append({names[id(lin)]: lin.weight.abs().float() * activations[names[id(lin)]].reshape(1, -1).float().sqrt()
                           for lin in linear_layers(block).values()})
    sizes = {n: s.numel() for block in blocks for n, s in block.items()}
    return owl(blocks, sizes, target, m, lam, low, high)
