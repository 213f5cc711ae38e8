"""The weight update: SparseGPT's optimal-brain-surgeon reconstruction, with the rule that picks
each block's mask given as a tree.

SparseGPT (Frantar & Alistarh, 2023) walks a layer's input columns in blocks of 128. In each block
it picks the mask from ``w^2 / d^2`` (``d``: the diagonal of the block of the upper Cholesky factor
of ``H^-1``), on the block's *current* weights (already corrected by the blocks before), then
zeroes the masked weights one column at a time, spreading each column's error ``(w - q) / d`` over
the block's later columns at once and over the following blocks when the block ends (lazy batch).

Here the saliency is any tree over the block's statistics: ``W`` (|current weights|), ``D`` (per
input column, ``1 / d``, read exactly where SparseGPT reads ``d``), ``X`` and ``G`` (the layer's,
restricted to the block's columns). SparseGPT is the tree ``sqr(mul(W, D))``; ``--method sparsegpt``
*is* that tree, so the two give bit-identical weights. Wanda with an OBS update (the ablation in the
Wanda code) is ``mul(W, sqrt(X))`` with ``update: obs``.

Scope of a block's ranking: the whole block (all rows), as the reference, or each row of the block
(``scope="row"``); N:M ranks each group of M columns per row when the loop reaches the group's first
column, on the group's current weights.
"""

from __future__ import annotations

import torch

from prunerzero.choices import OBS_SCOPES, UPDATES, choose
from prunerzero.errors import UserError
from prunerzero.primitives.registry import finite
from prunerzero.primitives.tree import Tree
from prunerzero.pruning.layer_masks import MaskRule, tree_mask
from prunerzero.pruning.masks import Pattern

SPARSEGPT_TREE = Tree.parse("sqr(mul(W, D))")
BLOCKSIZE = 128
PERCDAMP = 0.01


def d_of(hinv_diagonal: torch.Tensor) -> torch.Tensor:
    """The terminal ``D`` from the diagonal of ``Hinv`` (SparseGPT's ``d``): ``1 / d`` as a (1, k) row."""
    return (1.0 / hinv_diagonal.float()).reshape(1, -1)


def block_stats(tree: Tree, weight: torch.Tensor, d: torch.Tensor, x: torch.Tensor | None,
                g: torch.Tensor | None, cols: slice) -> dict[str, torch.Tensor]:
    """The statistics of one block the tree reads: ``weight`` (out, k) the block's current weights,
    ``d`` (k,) the diagonal of its ``Hinv`` block, ``x`` (in,) and ``g`` (out, in) the layer's, cut to
    ``cols``."""
    stats: dict[str, torch.Tensor] = {"W": weight.abs()}
    terminals = tree.terminals
    if "D" in terminals:
        stats["D"] = d_of(d)
    if "X" in terminals:
        stats["X"] = finite(x.reshape(1, -1)[:, cols].float())
    if "G" in terminals:
        stats["G"] = g[:, cols].float()
    return stats


def inverse_hessian_factor(hessian: torch.Tensor, name: str = "the layer", nsamples: int | None = None,
                           percdamp: float = PERCDAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT's ``Hinv`` and the layer's dead inputs: dead inputs (``H_jj = 0``) get ``H_jj = 1``
    (their weights are zeroed by the update), damping ``percdamp * mean(diag H)``, then the upper
    Cholesky factor of the inverse. Returns (factor, dead). A Hessian that is not positive definite
    is refused with the way out. It depends on the Hessian alone, so a run computes it once per
    layer (``stats_mode: once``) and every candidate reuses it."""
    H = hessian.clone().float()
    cols = H.shape[0]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    H[torch.arange(cols), torch.arange(cols)] += percdamp * torch.mean(torch.diag(H))
    try:
        return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True), dead
    except torch.linalg.LinAlgError:
        seen = f" from {nsamples} calibration windows" if nsamples else ""
        more = f" (e.g. --nsamples {2 * nsamples})" if nsamples else ""
        raise UserError(f"the Hessian of {name} ({cols} x {cols}){seen} is not positive definite even with "
                        f"{percdamp:.0%} damping: add calibration windows{more} or use longer ones") from None


def obs_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, pattern: Pattern,
              tree: Tree = SPARSEGPT_TREE, x: torch.Tensor | None = None, g: torch.Tensor | None = None,
              scope: str = "block", name: str = "the layer", nsamples: int | None = None,
              blocksize: int = BLOCKSIZE, percdamp: float = PERCDAMP) -> torch.Tensor:
    """Prune one layer with the OBS update, each block's mask picked by ``tree``; returns the new weight."""
    factor, dead = inverse_hessian_factor(hessian, name, nsamples, percdamp)
    return obs_update(weight, factor, dead, sparsity, pattern, tree, x, g, scope, name, blocksize)


def obs_update(weight: torch.Tensor, factor: torch.Tensor, dead: torch.Tensor, sparsity: float, pattern: Pattern,
               tree: Tree = SPARSEGPT_TREE, x: torch.Tensor | None = None, g: torch.Tensor | None = None,
               scope: str = "block", name: str = "the layer", blocksize: int = BLOCKSIZE) -> torch.Tensor:
    """The OBS update of one layer from its Hessian's factor (:func:`inverse_hessian_factor`)."""
    choose(scope, OBS_SCOPES, "the OBS mask scope (--obs-scope)")
    W = weight.detach().clone().float()
    W[:, dead] = 0
    Hinv = factor
    cols = W.shape[1]
    rule = MaskRule(sparsity, pattern, "tensor" if scope == "block" else "row")
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        # The block is held transposed (column i of the layer = row i, contiguous) and each column
        # costs its error and one rank-1 correction of the block's later columns. After column i's
        # own correction a kept weight is exactly what it was (its error is 0) and a pruned one is
        # set to 0 below, so the block ends as the reference's Q without building Q. Every float op
        # is the reference's, in its order (an FMA such as addcmul_ would round differently), so the
        # weights are bit-identical to the published loop, 1.5x faster (benchmarks/obs_update.py).
        W1 = W[:, i1:i2].t().contiguous()
        Err1 = torch.empty_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diag(Hinv1)
        if pattern.structured:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        else:
            mask1 = tree_mask(tree, block_stats(tree, W1.t(), d1, x, g, slice(i1, i2)), (W1.shape[1], W1.shape[0]),
                              rule, f"{name}, input columns {i1}-{i2 - 1}").t().contiguous()
        for i in range(i2 - i1):
            if pattern.structured and i % pattern.m == 0:
                j = min(i + pattern.m, i2 - i1)
                group = W1[i:j].t()
                mask1[i:j] = tree_mask(tree, block_stats(tree, group, d1[i:j], x, g, slice(i1 + i, i1 + j)),
                                       group.shape, rule, f"{name}, input columns {i1 + i}-{i1 + j - 1}").t()
            err = Err1[i]
            torch.mul(W1[i], mask1[i], out=err).div_(Hinv1[i, i])
            W1[i:] -= torch.outer(Hinv1[i, i:], err)
        W1.masked_fill_(mask1, 0)
        W[:, i1:i2] = W1.t()
        W[:, i2:] -= Err1.t().contiguous() @ Hinv[i1:i2, i2:]
    return W.to(weight.dtype)


def check_update(update: str, method: str, tree: Tree | None) -> None:
    """``update`` with a method and tree: D exists only inside the OBS update, and the update needs a
    rule (a tree, or sparsegpt's own)."""
    choose(update, UPDATES, "--update")
    if update == "obs" and method not in ("tree", "sparsegpt"):
        raise UserError(f"--update obs picks masks with a tree inside SparseGPT's update: use --method tree --tree "
                        f"{method if method != 'magnitude' else 'abs(W)'} --update obs (or --method sparsegpt), "
                        f"not --method {method}")
    if tree is not None and "D" in tree.terminals and update != "obs":
        raise UserError(f"{tree} reads D (1 / [H^-1]_jj), which exists only inside the OBS update: add --update obs")

