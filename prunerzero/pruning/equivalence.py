"""Do two metrics prune alike? The numerical check behind opposing-operation simplification.

SymPy cancels ``exp(log x)`` exactly, but the protected torch operators differ from their SymPy
images in corners (``log`` adds 0.001, ``exp`` clamps at 100). A simplification is accepted only if
the simplified tree prunes the same weights as the original on *probe statistics*: rows of the
run's own W, G and X where they exist, else synthetic statistics of the scale real ones have
(|W| ~ 1e-2, G ~ 1e-3..1e1, X ~ 1e-1..1e5). "The same" allows near-ties to swap: at most
:data:`TOLERANCE` of the mask entries may differ (the guards move scores by a relative 1e-5 or less
on such statistics, which reorders only weights whose scores tie to that precision).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from prunerzero.primitives.tree import Tree
from prunerzero.pruning.layer_masks import MaskRule, UnrankableLayer, tree_mask
from prunerzero.pruning.masks import Pattern

Probe = Mapping[str, torch.Tensor]

TOLERANCE = 1e-3
SPARSITIES = (0.3, 0.5, 0.7)


def synthetic_probes(seed: int = 1234) -> list[dict[str, torch.Tensor]]:
    """Statistics with the scales and spread of real ones (SmolLM2 / LLaMA layers)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for rows, cols in ((16, 576), (16, 256)):
        row_scale = torch.exp(torch.randn(rows, 1, generator=gen) * 0.5)
        w = torch.randn(rows, cols, generator=gen).abs() * 0.02 * row_scale
        g = torch.randn(rows, cols, generator=gen).abs() * 10 ** (torch.rand(rows, 1, generator=gen) * 4 - 3)
        x = 10 ** (torch.rand(1, cols, generator=gen) * 6 - 1)
        d = synthetic_d(cols, seed)
        out.append({"W": w, "G": g, "X": x, "D": d})
    return out


def synthetic_d(cols: int, seed: int) -> torch.Tensor:
    """A stand-in for the OBS update's D (1 / [H^-1]_jj: positive, spread over decades like X), from a
    generator of its own so that the other probe statistics stay what they were before D existed."""
    gen = torch.Generator().manual_seed(seed + cols)
    return 10 ** (torch.rand(1, cols, generator=gen) * 3 - 1)


def probes_from_layers(layers: Sequence[Mapping[str, torch.Tensor]], rows: int = 16, seed: int = 1234) -> list[dict[str, torch.Tensor]]:
    """Probe statistics from real layers: ``rows`` output rows drawn (seeded) from each layer's
    W and G, with its X whole. Each mapping holds W (|weight|), X of shape (1, in), and G if known."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for layer in layers:
        w = layer["W"]
        pick = torch.randperm(w.shape[0], generator=gen)[:rows]
        probe = {"W": w[pick].float().cpu(), "X": layer["X"].reshape(1, -1).float().cpu()}
        probe["G"] = layer["G"][pick].float().cpu() if layer.get("G") is not None else torch.ones_like(probe["W"])
        if layer.get("D") is not None:  # the OBS update's D, where the run has its factors
            probe["D"] = layer["D"].reshape(1, -1).float().cpu()
        else:
            probe["D"] = synthetic_d(w.shape[1], seed)
        out.append(probe)
    return out


def same_masks(a: Tree, b: Tree, probes: Sequence[Probe], pattern: Pattern = Pattern(),
               sparsities: Sequence[float] = SPARSITIES, tolerance: float = TOLERANCE, group: str = "row") -> bool:
    """Whether two trees prune the same weights on the probes (per row, or per N:M group; ``group``
    "tensor": ranked over the whole probe, as the OBS update ranks a block)."""
    if pattern.structured:
        sparsities = (pattern.n / pattern.m,)
    for stats in probes:
        shape = stats["W"].shape
        if pattern.structured and shape[1] % pattern.m:
            continue
        for s in sparsities:
            rule = MaskRule(s, pattern, group)
            ma, mb = _mask_or_none(a, stats, shape, rule), _mask_or_none(b, stats, shape, rule)
            if ma is None or mb is None:
                if ma is not mb:  # one ranks the weights, the other cannot: they prune differently
                    return False
            elif int((ma != mb).sum()) > tolerance * ma.numel():
                return False
    return True


def _mask_or_none(tree: Tree, stats: Probe, shape: torch.Size, rule: MaskRule) -> torch.Tensor | None:
    """The tree's mask on a probe, or None where it cannot rank the probe's weights."""
    try:
        return tree_mask(tree, stats, shape, rule, "a probe")
    except UnrankableLayer:
        return None
