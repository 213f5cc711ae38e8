"""The OBS update of one transformer block's layers: ``obs_update`` against the published SparseGPT
loop transcribed plainly (same tree, same masks), side by side in one run.

Shapes are SmolLM2-135M's (q/o 576x576, k/v 192x576, gate/up 1536x576, down 576x1536); the Hessians
come from correlated random inputs. Prints per pattern the median seconds of each (over ``--repeats``),
their ratio, and whether the weights are bit-identical.

    python benchmarks/obs_update.py --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from prunerzero.primitives.tree import Tree
from prunerzero.pruning.layer_masks import MaskRule, tree_mask
from prunerzero.pruning.masks import Pattern
from prunerzero.pruning.obs import SPARSEGPT_TREE, block_stats, inverse_hessian_factor, obs_update

SHAPES = {"q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576),
          "gate": (1536, 576), "up": (1536, 576), "down": (576, 1536)}


def published_loop(weight: torch.Tensor, factor: torch.Tensor, dead: torch.Tensor, sparsity: float,
                   pattern: Pattern, tree: Tree, blocksize: int = 128) -> torch.Tensor:
    """SparseGPT's column loop as published (Q, Err and the block's mask per block), the mask from ``tree``."""
    W = weight.clone().float()
    W[:, dead] = 0
    rule = MaskRule(sparsity, pattern, "tensor")
    for i1 in range(0, W.shape[1], blocksize):
        i2 = min(i1 + blocksize, W.shape[1])
        W1, Hinv1 = W[:, i1:i2].clone(), factor[i1:i2, i1:i2]
        Q1, Err1, d1 = torch.zeros_like(W1), torch.zeros_like(W1), torch.diag(Hinv1)
        mask1 = (torch.zeros_like(W1, dtype=torch.bool) if pattern.structured
                 else tree_mask(tree, block_stats(tree, W1, d1, None, None, slice(i1, i2)), W1.shape, rule, "block"))
        for i in range(i2 - i1):
            if pattern.structured and i % pattern.m == 0:
                cut = slice(i, i + pattern.m)
                mask1[:, cut] = tree_mask(tree, block_stats(tree, W1[:, cut], d1[cut], None, None, cut),
                                          W1[:, cut].shape, rule, "group")
            w = W1[:, i]
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i], err = q, (w - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ factor[i1:i2, i2:]
    return W


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    layers = []
    for rows, cols in SHAPES.values():
        x = torch.randn(2048, cols, generator=gen) @ (torch.eye(cols) + torch.randn(cols, cols, generator=gen) / cols ** 0.5)
        factor, dead = inverse_hessian_factor(2 * x.T @ x / 2048)
        layers.append((torch.randn(rows, cols, generator=gen), factor, dead))
    for pattern in (Pattern.parse("unstructured"), Pattern.parse("2:4")):
        times: dict[str, list[float]] = {"published": [], "obs_update": []}
        identical = True
        for _ in range(args.repeats):
            for name, run in (("published", published_loop), ("obs_update", obs_update)):
                start = time.perf_counter()
                out = [run(w, f, d, 0.5, pattern, SPARSEGPT_TREE) for w, f, d in layers]
                times[name].append(time.perf_counter() - start)
                if name == "published":
                    ref = out
            identical &= all(torch.equal(a, b) for a, b in zip(ref, out))
        pub, ours = statistics.median(times["published"]), statistics.median(times["obs_update"])
        print(f"{pattern}: one block's 7 layers, median of {args.repeats}: published loop {pub:.3f} s, "
              f"obs_update {ours:.3f} s, speedup {pub / ours:.2f}x, bit-identical: {identical}")


if __name__ == "__main__":
    main()
