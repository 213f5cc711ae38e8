"""Does a fitness depend on torch's thread count? X, Wanda masks and fitness with 1 and 2 threads.

SmolLM2-135M, 2 calibration windows of 512 tokens, 2 fitness windows of 512 (validation, apart
from the calibration windows). Prints whether the activation statistics, the masks and the
perplexity are bitwise equal across the two thread counts (they were on this 2-core AMD EPYC,
AVX512, torch 2.13.0+cpu).

    python benchmarks/threads_determinism.py
"""

from __future__ import annotations

import numpy as np
import torch

from prunerzero.data import calibration_windows, fitness_tokens
from prunerzero.models import load_model, prunable_linears
from prunerzero.perplexity import window_losses
from prunerzero.primitives.tree import Tree
from prunerzero.pruning.layer_masks import layer_stats
from prunerzero.pruning.masks import Pattern, prune_mask
from prunerzero.pruning.prune import masked_weights
from prunerzero.pruning.stats import collect_activation_norms


def measure(model, linears, windows, tokens, threads: int) -> tuple[dict, dict, float]:
    wanda = Tree.parse("mul(abs(W), sqrt(X))")
    torch.set_num_threads(threads)
    acts = collect_activation_norms(model, windows)
    torch.set_num_threads(1)  # masks are always made on one thread (ModelFitness does the same)
    masks = {name: prune_mask(wanda.evaluate(layer_stats(lin.weight, acts[name], None), lin.weight.shape), 0.5,
                              Pattern.parse("unstructured")) for name, lin in linears.items()}
    torch.set_num_threads(threads)
    with masked_weights(model, masks):
        ppl = float(np.exp(np.mean(window_losses(model, tokens, 512, 2, progress=False))))
    return acts, masks, ppl


def main() -> None:
    model, tokenizer, _ = load_model("smollm2-135m", "cpu")
    windows = calibration_windows(tokenizer, "wikitext2", 2, 512, 0)
    tokens = fitness_tokens(tokenizer, "wikitext2", "validation", 512, 2, ("wikitext2", None, 2, 512, 0))
    linears = prunable_linears(model)
    a1, m1, p1 = measure(model, linears, windows, tokens, 1)
    a2, m2, p2 = measure(model, linears, windows, tokens, 2)
    worst = max(float(((a1[k] - a2[k]).abs() / a1[k].abs().clamp_min(1e-30)).max()) for k in a1)
    print(f"X bitwise equal across 1 and 2 threads: {all(torch.equal(a1[k], a2[k]) for k in a1)}; "
          f"largest relative difference {worst:.3g}")
    print(f"mask entries that differ: {sum(int((m1[k] != m2[k]).sum()) for k in m1)} of "
          f"{sum(m.numel() for m in m1.values())}")
    print(f"fitness: 1 thread {p1!r}, 2 threads {p2!r}, equal: {p1 == p2}")


if __name__ == "__main__":
    main()
