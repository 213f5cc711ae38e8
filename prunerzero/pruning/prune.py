"""Pruning methods: magnitude, wanda, ria, sparsegpt and any symbolic tree, over one mask routine.

Every method is a tree (wanda, ria, magnitude: :mod:`prunerzero.primitives.known`; ``tree``: the
user's) whose masks come from :mod:`prunerzero.pruning.layer_masks`, the one path from a tree to
masks; ``magnitude`` ranks |W| over the whole layer, as the reference ``prune_magnitude`` of Wanda
and Pruner-Zero does (the tree ``abs(W)`` ranks per row, like every tree). Weights under the mask
are set to zero; with the OBS update (and ``sparsegpt``) the tree picks each block's mask inside
SparseGPT's reconstruction (:mod:`prunerzero.pruning.obs`, through the same path).

Methods that need activations (wanda, trees using ``X``, sparsegpt) walk the decoder block by block
with :func:`iterate_blocks`, as the reference code does: each block sees the outputs of the already
pruned blocks before it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from prunerzero.choices import METHODS, allocation_needs_unstructured, choose
from prunerzero.errors import UserError
from prunerzero.models import prunable_linears
from prunerzero.primitives.known import KNOWN_METRICS
from prunerzero.primitives.tree import Tree
from prunerzero.pruning.allocation import Allocation
from prunerzero.pruning.layer_masks import MaskRule, layer_stats, model_masks, tree_mask
from prunerzero.pruning.layerwise import InputStatistics, iterate_blocks
from prunerzero.pruning.masks import PackedMasks, Pattern
from prunerzero.pruning.obs import SPARSEGPT_TREE, check_update, obs_prune

log = logging.getLogger(__name__)

# Methods whose scores are a known metric's tree, ranked per output row (or N:M group).
TREE_METHODS = ("wanda", "ria")


def method_tree(method: str, tree: Tree | None = None) -> Tree | None:
    """The tree whose scores a method ranks: the user's for ``tree``, the known metric's for wanda
    and ria, |W| for magnitude; None for sparsegpt (which scores inside its own update)."""
    if method == "tree":
        return tree
    if method in TREE_METHODS or method == "magnitude":
        return KNOWN_METRICS[method].tree
    return None


def comparison_group(method: str) -> str:
    """Where scores are compared for unstructured sparsity: the whole layer for magnitude (the
    reference ``prune_magnitude``), each output row for every other method."""
    return "tensor" if method == "magnitude" else "row"


@dataclass
class PruneReport:
    method: str
    pattern: str
    sparsity_target: float
    seconds: float
    layer_sparsity: dict[str, float] = field(default_factory=dict)  # fraction of zeros per layer
    layer_sparsity_counts: dict[str, tuple[int, int]] = field(default_factory=dict)  # (zeros, total)
    allocation: dict | None = None  # the layerwise allocation used, when one was

    @property
    def sparsity_actual(self) -> float:
        return layer_sparsity_total(self.layer_sparsity_counts)


def layer_sparsity_total(counts: Mapping[str, tuple[int, int]]) -> float:
    zeros = sum(z for z, _ in counts.values())
    total = sum(t for _, t in counts.values())
    return zeros / total if total else 0.0


def measure_sparsity(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(zeros, total) of every prunable linear layer's weight."""
    return {n: (int((l.weight == 0).sum()), l.weight.numel()) for n, l in prunable_linears(model).items()}


def score_masks(
    model: nn.Module,
    tree: Tree,
    sparsity: float,
    pattern: Pattern,
    activations: Mapping[str, torch.Tensor] | None = None,
    gradients: Mapping[str, torch.Tensor] | None = None,
    group: str = "row",
    allocation: Allocation | None = None,
) -> PackedMasks:
    """Masks of every prunable layer from statistics computed beforehand (no calibration pass)."""
    rule = MaskRule(sparsity, pattern, group, None if allocation is None else allocation.counts)
    return model_masks(tree, prunable_linears(model), lambda name, lin: layer_stats(
        lin.weight, _get(activations, name), _get(gradients, name)), rule)


def _get(stats: Mapping[str, torch.Tensor] | None, name: str) -> torch.Tensor | None:
    return None if stats is None else stats.get(name)


@dataclass
class AppliedMasks:
    """What :func:`masked_weights` yields: the seconds its hooks spent applying and restoring."""

    seconds: float = 0.0


@contextmanager
def masked_weights(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> Iterator[AppliedMasks]:
    """Inside the block, forwards see the masked weights zeroed; the dense weights are never written.

    Each linear layer swaps in ``W.masked_fill(mask, 0)`` just before it runs and swaps the dense
    tensor back just after, so at most one layer's pruned copy exists at a time and "restoring" is
    exact by construction. Used by fitness evaluation, where the model must stay dense. The
    yielded :class:`AppliedMasks` adds up the time spent in the swaps.
    """
    linears = prunable_linears(model)
    dense: dict[str, torch.Tensor] = {}
    applied = AppliedMasks()
    # One pruned-weight buffer (and keep-mask buffer) per layer shape, reused by every layer of
    # that shape: a fresh tensor per layer costs page faults, and a multiply by the keep mask is
    # several times faster than masked_fill on CPU.
    buffers: dict[tuple, torch.Tensor] = {}
    handles = []
    for name in masks:
        lin = linears[name]

        def before(mod: nn.Module, _args: Any, name: str = name) -> None:
            start = time.perf_counter()
            weight = mod.weight.data
            key = (weight.shape, weight.dtype, weight.device)
            if key not in buffers:
                buffers[key] = torch.empty_like(weight)
            pruned = buffers[key]
            if isinstance(masks, PackedMasks):  # unpacked here, one layer at a time, already inverted
                keep = masks.keep(name)
            else:
                keep_key = ("keep", weight.shape, weight.device)
                if keep_key not in buffers:
                    buffers[keep_key] = torch.empty_like(weight, dtype=torch.bool)
                keep = torch.logical_not(masks[name], out=buffers[keep_key])
            # As bytes: float x uint8 runs 3.7x faster than float x bool on CPU (177 against 656 us
            # for a 1536 x 576 layer), with the same products.
            torch.mul(weight, keep.view(torch.uint8), out=pruned)
            dense[name] = weight
            mod.weight.data = pruned
            applied.seconds += time.perf_counter() - start

        def after(mod: nn.Module, _args: Any, _out: Any, name: str = name) -> None:
            mod.weight.data = dense.pop(name)

        handles += [lin.register_forward_pre_hook(before), lin.register_forward_hook(after)]
    try:
        yield applied
    finally:
        for h in handles:
            h.remove()
        for name, weight in dense.items():  # a forward that raised mid-layer
            linears[name].weight.data = weight


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Zero the masked weights in place; returns the values removed, for :func:`restore_masks`."""
    linears = prunable_linears(model)
    removed = {}
    for name, mask in masks.items():
        w = linears[name].weight.data
        removed[name] = w.masked_select(mask)
        w.masked_fill_(mask, 0)
    return removed


@torch.no_grad()
def restore_masks(model: nn.Module, masks: Mapping[str, torch.Tensor], removed: Mapping[str, torch.Tensor]) -> None:
    """Put back exactly the values :func:`apply_masks` removed (bitwise)."""
    linears = prunable_linears(model)
    for name, mask in masks.items():
        linears[name].weight.data.masked_scatter_(mask, removed[name])


@dataclass
class Removed:
    """What pruning took out of a model, enough to put it back bit for bit: the masks (packed) and
    the values they zeroed, about half a copy of the weights at 50% sparsity instead of a whole one."""

    masks: PackedMasks = field(default_factory=PackedMasks)
    values: dict[str, torch.Tensor] = field(default_factory=dict)

    @torch.no_grad()
    def zero(self, name: str, weight: torch.Tensor, mask: torch.Tensor) -> None:
        self.masks.add(name, mask)
        self.values[name] = weight.masked_select(mask)
        weight.masked_fill_(mask, 0)

    def restore(self, model: nn.Module) -> None:
        restore_masks(model, self.masks, self.values)


@torch.no_grad()
def prune_model(
    model: nn.Module,
    method: str,
    sparsity: float,
    pattern: Pattern,
    windows: torch.Tensor | None = None,
    tree: Tree | None = None,
    gradients: Mapping[str, torch.Tensor] | None = None,
    activations: Mapping[str, torch.Tensor] | None = None,
    removed: Removed | None = None,
    allocation: Allocation | None = None,
    update: str = "none",
    obs_scope: str = "block",
) -> PruneReport:
    """Prune ``model`` in place and report what was done.

    ``allocation`` given (unstructured only): each layer prunes exactly its count of weights
    instead of ``sparsity`` of them (SparseGPT: its ratio).

    ``removed`` given: it collects what was zeroed, so that ``removed.restore(model)`` undoes the
    pruning exactly (masking methods only; SparseGPT also updates the weights it keeps).

    ``activations`` given: X is taken from it (the "statistics once per run" mode) and no
    calibration pass is made. Otherwise methods that need X or a Hessian walk the blocks with the
    calibration ``windows`` (the reference, sequential mode).

    ``update="obs"``: SparseGPT's weight reconstruction, each block's mask picked by the tree
    (:mod:`prunerzero.pruning.obs`; ``sparsegpt`` is the tree ``sqr(mul(W, D))`` with it), ranked over
    the block (``obs_scope="block"``, the reference) or per row of the block (``"row"``).
    """
    choose(method, METHODS, "method")
    if method == "tree" and tree is None:
        raise UserError("method tree needs a tree: --tree FILE.json (or --tree pruner-zero)")
    check_update(update, method, tree)
    # with the OBS update the rule picks masks inside obs_prune; otherwise scores are ranked once
    rule = SPARSEGPT_TREE if method == "sparsegpt" else (tree if update == "obs" else None)
    scored = method_tree(method, tree)
    group = comparison_group(method)
    needs = (rule.terminals - {"D"}) | {"W", "H"} if rule is not None else scored.terminals | {"W"}
    if allocation is not None:
        allocation_needs_unstructured(pattern.structured, f"--pattern {pattern}")
    if allocation is not None and set(allocation.counts) != set(prunable_linears(model)):
        raise UserError("the allocation does not name this model's layers; compute it for this model")
    if removed is not None and rule is not None:
        raise ValueError("the OBS update changes the weights it keeps; it cannot be undone from what it removed")
    if "G" in needs and gradients is None:
        raise UserError(f"{'tree ' + str(tree) if tree else method} uses G: gradients are needed")
    mask_rule = MaskRule(sparsity, pattern, group, None if allocation is None else allocation.counts)
    start = time.perf_counter()
    names = {id(m): n for n, m in model.named_modules()}
    if ("X" in needs and activations is None) or "H" in needs:
        if windows is None:
            raise UserError(f"method {method} needs calibration windows (--nsamples, --seqlen)")
        bar = tqdm(desc=f"prune {method}", unit="block")

        def on_block(_i: int, linears: dict[str, nn.Linear], stats: dict[str, InputStatistics]) -> bool:
            for short, lin in linears.items():
                name = names[id(lin)]
                if rule is not None:
                    ratio = sparsity if allocation is None else allocation.ratios[name]
                    lin.weight.data = obs_prune(lin.weight.data, stats[short].hessian, ratio, pattern, rule,
                                                x=stats[short].scaler_row, g=_get(gradients, name), scope=obs_scope,
                                                name=name, nsamples=stats[short].nsamples)
                else:
                    mask = tree_mask(scored, layer_stats(lin.weight, stats[short].scaler_row, _get(gradients, name)),
                                     lin.weight.shape, mask_rule, name, mask_rule.count(name))
                    if removed is not None:
                        removed.zero(name, lin.weight.data, mask)
                    else:
                        lin.weight.data[mask] = 0
            return True

        iterate_blocks(model, windows, on_block, hessian="H" in needs,
                       progress=lambda i, n: (setattr(bar, "total", n), bar.update(1)))
        bar.close()
    else:
        masks = score_masks(model, scored, sparsity, pattern, activations, gradients, group, allocation)
        if removed is not None:
            linears = prunable_linears(model)
            for name, mask in masks.items():
                removed.zero(name, linears[name].weight.data, mask)
        else:
            apply_masks(model, masks)
    seconds = time.perf_counter() - start
    counts = measure_sparsity(model)
    label = f"{method} + obs" if update == "obs" and method == "tree" else method
    report = PruneReport(label if allocation is None else f"{label} ({allocation.method} allocation)", str(pattern),
                         sparsity, seconds,
                         {n: z / t for n, (z, t) in counts.items()}, counts)
    log.info("pruned with %s (%s, target %.3f): actual sparsity %.4f in %.1f s",
             method if method != "tree" else f"tree {tree}" + (" + obs" if update == "obs" else ""), pattern, sparsity, report.sparsity_actual, seconds)
    return report

