"""Fitness of a tree on a real model: scores -> masks -> prune -> perplexity -> restore.

:class:`ModelFitness` holds one model, its statistics and the fitness tokens, and evaluates trees
one after another; both the in-process evaluator and each Ray actor own one. The dense weights are
never copied: pruning saves only the values it zeroes and puts exactly those back.

Statistics modes:
- ``once`` (default): X and G come from the dense model, computed once per run and cached in the
  run folder; a candidate costs its masks plus the fitness forward pass.
- ``sequential``: the reference procedure; X is re-collected block by block on the partly pruned
  model for every candidate (a calibration pass per candidate).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from prunerzero.choices import OBS_SCOPES, STATS_MODES, UPDATES, check_allocation, choose
from prunerzero.data import fitness_tokens
from prunerzero.errors import UserError
from prunerzero.fitness.base import Evaluator, FitnessResult, mask_cache_key, with_progress
from prunerzero.fitness.obs_fitness import obs_layers, run_obs_factors, swapped_weights, zero_pattern
from prunerzero.memory import keep_freed_memory
from prunerzero.models import load_model, prunable_linears, resolve_model
from prunerzero.perplexity import perplexity_of, window_losses
from prunerzero.primitives.tree import Tree
from prunerzero.pruning.allocation import OWL_LAMBDA, OWL_M, Allocation, exact_counts, owl_for_model
from prunerzero.pruning.calibration import Calibration, gradients_for
from prunerzero.pruning.equivalence import probes_from_layers
from prunerzero.pruning.layer_masks import MaskRule, UnrankableLayer, layer_stats, model_masks
from prunerzero.pruning.masks import PackedMasks, Pattern, check_sparsity
from prunerzero.pruning.obs import d_of
from prunerzero.pruning.prune import Removed, masked_weights, prune_model
from prunerzero.pruning.stats import (
    GRADIENT_SCALE,
    cache_key,
    collect_activation_norms,
    load_tensors_mapped,
    save_tensors_atomic,
    stream_gradients,
)

log = logging.getLogger(__name__)

# Fitness windows are run this many tokens per forward pass: the masks are swapped in once per
# pass, and larger matrix products run faster. Activation memory grows with it.
FORWARD_TOKENS = 4096


@dataclass(frozen=True)
class FitnessSettings:
    """Everything a fitness value depends on. Two runs with equal settings give equal fitnesses."""

    model: str = "smollm2-135m"
    sparsity: float = 0.5
    pattern: str = "unstructured"
    calibration: Calibration = field(default_factory=Calibration)
    text: str = "wikitext2"  # the fitness text: never the test split
    split: str = "validation"
    seqlen: int = 1024
    windows: int = 2  # token budget = windows * seqlen
    stats_mode: str = "once"
    device: str = "cpu"
    # Fitness windows avoid every calibration window (same text). False only in fingerprints of
    # runs written before this was the rule, which resume then refuses.
    disjoint_from_calibration: bool = True
    allocation: str | None = None  # None: every layer at `sparsity`; "uniform" or "owl": exact counts per layer
    owl_m: float = OWL_M
    owl_lambda: float = OWL_LAMBDA
    sparsity_range: tuple[float, float] = (0.0, 0.99)
    gradient_calibration: Calibration | None = None  # None: G from `calibration`'s windows, as X
    update: str = "none"  # "obs": the tree picks each block's mask inside SparseGPT's weight update
    obs_scope: str = "block"

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity, Pattern.parse(self.pattern))
        check_allocation(self.allocation, Pattern.parse(self.pattern).structured, "fitness.allocation", files=False)
        choose(self.stats_mode, STATS_MODES, "fitness.stats_mode")
        choose(self.update, UPDATES, "fitness.update")
        choose(self.obs_scope, OBS_SCOPES, "fitness.obs_scope")

    def fingerprint(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("device")
        if self.allocation is None:  # runs without an allocation keep the fingerprint they always had
            for key in ("allocation", "owl_m", "owl_lambda", "sparsity_range"):
                d.pop(key)
        else:
            d["sparsity_range"] = list(self.sparsity_range)
        d["calibration"] = self.calibration.key()
        if self.gradient_calibration is None:  # runs without one keep the fingerprint they always had
            d.pop("gradient_calibration")
        else:
            d["gradient_calibration"] = self.gradient_calibration.key()
        if self.update == "none":  # and runs without a weight update too
            d.pop("update")
            d.pop("obs_scope")
        return d

    @property
    def mask_group(self) -> str:
        """Where the rule's scores are compared: the whole block inside the OBS update (its reference
        scope), else each row."""
        return "tensor" if self.update == "obs" and self.obs_scope == "block" else "row"

    @property
    def g_calibration(self) -> Calibration:
        """The windows G is computed from."""
        return self.gradient_calibration or self.calibration

    def calibrations(self) -> list[Calibration]:
        """Every window set the statistics read (X's, then G's when apart); the fitness windows
        avoid them all."""
        return [self.calibration] + ([self.gradient_calibration] if self.gradient_calibration else [])


def mask_key(masks: Mapping[str, torch.Tensor]) -> str:
    """Hash of a whole mask set: equal keys mean equal pruned models, so equal fitness."""
    return (masks if isinstance(masks, PackedMasks) else PackedMasks.of(masks)).key()


def statistics_paths(settings: FitnessSettings, run_dir: str | Path, fingerprint: str | None = None) -> tuple[Path, Path]:
    """(activations file, gradients file) where a run keeps X and G for these settings."""
    fingerprint = fingerprint or resolve_model(settings.model).fingerprint
    acts = cache_key(kind="activations", model=fingerprint, **settings.calibration.statistics_key())
    grads = cache_key(kind="gradients", scale=GRADIENT_SCALE, model=fingerprint, **settings.g_calibration.statistics_key())
    return Path(run_dir) / f"activations-{acts}.safetensors", Path(run_dir) / f"gradients-{grads}.safetensors"


def prepare_statistics(model: torch.nn.Module, tokenizer: object, source: Any, settings: FitnessSettings,
                       run_dir: Path, gradients: bool = True,
                       activations: bool = True) -> tuple[dict[str, torch.Tensor], Mapping[str, torch.Tensor]]:
    """(X, G) of the dense model, computed once and stored in the run folder (safetensors);
    later calls, and every Ray worker, load them. ``gradients=False`` (nothing the run evaluates
    reads G): G is neither computed nor loaded, and an empty mapping stands for it.
    ``activations=False`` (sequential statistics and no need for probes): the dense model's X is
    not collected unless already stored, and an empty mapping stands for it.

    On a CPU, G (as large as the model) is then read from its file a layer at a time as scores
    need it: a worker holds the model and one layer of G, and the file's pages are shared by
    every worker on the machine. An accelerator keeps G in its own memory."""
    path, grads_path = statistics_paths(settings, run_dir, source.fingerprint)
    windows = settings.calibration.windows(tokenizer) if activations and not path.is_file() else None
    g_windows = None
    if gradients and not grads_path.is_file():
        same = settings.gradient_calibration is None and windows is not None
        g_windows = windows if same else settings.g_calibration.windows(tokenizer)
    if path.is_file():
        acts = load_tensors_mapped(path)
    elif not activations:
        acts = {}
    else:
        acts = collect_activation_norms(model, windows)
        save_tensors_atomic(acts, path, metadata={"model": settings.model})
        log.info("activation statistics of %d layers stored in %s", len(acts), path)
    if not gradients:
        return acts, {}
    if next(model.parameters()).device.type != "cpu":
        return acts, gradients_for(model, source, g_windows, settings.g_calibration, Path(run_dir))
    if not grads_path.is_file():
        gradients_for(model, source, g_windows, settings.g_calibration, Path(run_dir))  # computed and stored
    return acts, stream_gradients(grads_path, model)


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``count`` inside the block, then restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class ModelFitness:
    """One model, its statistics and fitness tokens; evaluates trees one at a time."""

    def __init__(self, settings: FitnessSettings, run_dir: str | Path, model: Any = None, tokenizer: Any = None,
                 source: Any = None, gradients: bool = True, activations: bool = True):
        """``gradients=False``: no tree this fitness will see reads G, so G is never computed.
        ``activations=False`` (sequential mode only): the dense model's X is not collected, so there
        are no probe statistics (a re-score needs none; a search's simplifier does)."""
        if not activations and settings.stats_mode != "sequential":
            raise ValueError("only a sequential-mode fitness can do without the dense model's X")
        self.settings = settings
        self.pattern = Pattern.parse(settings.pattern)
        keep_freed_memory()  # this process evaluates candidate after candidate: reuse memory
        if model is None:
            model, tokenizer, source = load_model(settings.model, settings.device)
        self.model, self.tokenizer = model, tokenizer
        self.linears = prunable_linears(model)
        acts, grads = prepare_statistics(model, tokenizer, source, settings, Path(run_dir), gradients, activations)
        dev = next(model.parameters()).device
        self.activations = {k: v.to(dev) for k, v in acts.items()}  # a vector per layer: small
        self.gradients = grads  # on the model's device already; streamed from its file on a CPU
        self.tokens = fitness_tokens(tokenizer, settings.text, settings.split, settings.seqlen, settings.windows,
                                     [c.draw() for c in settings.calibrations()], settings.calibration.data_dir)
        self.calib_windows = settings.calibration.windows(tokenizer) if settings.stats_mode == "sequential" else None
        self.allocation = self._allocation()  # replaced per candidate by an allocation search
        self.obs_factors = run_obs_factors(model, tokenizer, source, settings, run_dir)
        self.known_masks: dict[str, float] = {}
        threads = torch.get_num_threads()
        on_cpu = next(model.parameters()).device.type == "cpu"
        self._layer_pool = ThreadPoolExecutor(threads, "layer-mask") if on_cpu and threads > 1 else None

    def masks(self, tree: Tree) -> PackedMasks | str:
        """The tree's masks (packed), or the reason it cannot rank weights.

        On a CPU with several threads, layers are scored and selected side by side, one torch
        thread each: the selection (numpy) runs on one core whatever torch's thread count, so two
        layers at a time beat one layer on two threads (SmolLM2-135M, 2 cores, five trees: 0.42
        to 0.61 s against 0.61 to 0.85 s per tree). Masks on a CPU are thus always computed with
        one torch thread, as in a one-thread Ray worker, so reductions (mms, zsn) round alike."""
        uses = tree.terminals  # only the statistics the tree reads: G may come from a file

        def stats_of(name: str, lin: torch.nn.Module) -> dict[str, torch.Tensor]:
            return layer_stats(lin.weight if "W" in uses else None,
                               self.activations.get(name) if "X" in uses else None,
                               self.gradients.get(name) if "G" in uses else None)

        try:
            if self._layer_pool is None:
                return model_masks(tree, self.linears, stats_of, self.mask_rule)
            with torch_threads(1):  # restored only after the last layer (model_masks waits for all)
                return model_masks(tree, self.linears, stats_of, self.mask_rule, self._layer_pool)
        except UnrankableLayer as e:
            return str(e)

    @property
    def mask_rule(self) -> MaskRule:
        # read at each use, never kept: an allocation search sets `allocation` for every candidate
        return MaskRule(self.settings.sparsity, self.pattern,
                        counts=None if self.allocation is None else self.allocation.counts)

    def _budget(self, budget: int | None) -> int | None:
        """None for the full budget, else a number of windows below it."""
        if budget is None or budget == self.settings.windows:
            return None
        if not 0 < budget < self.settings.windows:
            raise UserError(f"fitness budget {budget} windows is outside 1..{self.settings.windows} (fitness.windows)")
        return budget

    def forward_losses(self, budget: int | None = None) -> tuple[float, ...]:
        """Mean loss of each of the first ``budget`` fitness windows (all if None), the model as it is."""
        windows = self._budget(budget) or self.settings.windows
        return tuple(window_losses(self.model, self.tokens, self.settings.seqlen, windows, progress=False,
                                   windows_per_forward=max(1, FORWARD_TOKENS // self.settings.seqlen)))

    def forward_loss(self, budget: int | None = None) -> float:
        """Perplexity of the model as it is on the first ``budget`` fitness windows (all if None)."""
        return perplexity_of(self.forward_losses(budget))

    def evaluate(self, tree: Tree, budget: int | None = None) -> FitnessResult:
        start = time.perf_counter()
        budget = self._budget(budget)
        if self.settings.update == "obs":
            return self._evaluate_obs(tree, start, budget)
        if self.settings.stats_mode == "sequential":
            return self._evaluate_sequential(tree, start, budget)
        masks = self.masks(tree)
        if isinstance(masks, str):
            return FitnessResult.worst(masks, time.perf_counter() - start)
        key = mask_key(masks)
        t_mask = time.perf_counter()
        known = self.known_masks.get(mask_cache_key(key, budget))
        if known is not None:
            return FitnessResult(known, mask_key=key, seconds=t_mask - start, cached="mask", budget=budget)
        with masked_weights(self.model, masks) as applied:
            losses = self.forward_losses(budget)
        ppl = perplexity_of(losses)
        t_end = time.perf_counter()
        if not np.isfinite(ppl):
            return FitnessResult.measured(ppl, mask_key=key, seconds=t_end - start)
        self.known_masks[mask_cache_key(key, budget)] = ppl
        # Masks are applied layer by layer inside the forward pass (masked_weights): "forward" is
        # the pass without the time its hooks spent swapping masked weights in and out.
        timings = {"score_mask": t_mask - start, "apply_restore": applied.seconds,
                   "forward": t_end - t_mask - applied.seconds}
        return FitnessResult(ppl, mask_key=key, seconds=t_end - start, timings=timings, budget=budget,
                             window_losses=losses)

    def _evaluate_sequential(self, tree: Tree, start: float, budget: int | None) -> FitnessResult:
        removed = Removed()  # the zeroed values only: never a second copy of the model
        try:
            prune_model(self.model, "tree", self.settings.sparsity, self.pattern, windows=self.calib_windows,
                        tree=tree, gradients=self.gradients, removed=removed, allocation=self.allocation)
            losses = self.forward_losses(budget)
        except UnrankableLayer as e:
            return FitnessResult.worst(str(e), time.perf_counter() - start)
        finally:
            removed.restore(self.model)
        return FitnessResult.measured(perplexity_of(losses), seconds=time.perf_counter() - start, budget=budget,
                                      window_losses=losses)

    def _evaluate_obs(self, tree: Tree, start: float, budget: int | None) -> FitnessResult:
        """The tree inside SparseGPT's update: reconstructed layers swapped in, the dense ones back after."""
        s = self.settings
        with swapped_weights(self.linears):
            try:
                if s.stats_mode == "sequential":
                    prune_model(self.model, "tree", s.sparsity, self.pattern, windows=self.calib_windows, tree=tree,
                                gradients=self.gradients, allocation=self.allocation, update="obs",
                                obs_scope=s.obs_scope)
                else:
                    for name, new in obs_layers(self.linears, tree, s.sparsity, self.pattern, self.obs_factors,
                                                self.activations, self.gradients, self.allocation, s.obs_scope):
                        self.linears[name].weight.data = new
            except UnrankableLayer as e:
                return FitnessResult.worst(str(e), time.perf_counter() - start)
            key = mask_key(zero_pattern(self.linears))
            t_update = time.perf_counter()
            known = self.known_masks.get(mask_cache_key(key, budget))
            if known is not None:
                return FitnessResult(known, mask_key=key, seconds=t_update - start, cached="mask", budget=budget)
            losses = self.forward_losses(budget)
        ppl = perplexity_of(losses)
        t_end = time.perf_counter()
        if np.isfinite(ppl):
            self.known_masks[mask_cache_key(key, budget)] = ppl
        return FitnessResult.measured(ppl, mask_key=key, seconds=t_end - start, budget=budget,
                                      timings={"update": t_update - start, "forward": t_end - t_update},
                                      window_losses=losses)

    def _allocation(self) -> Allocation | None:
        """The run's layerwise allocation, from the dense model's statistics (fixed for the run)."""
        s = self.settings
        if s.allocation is None:
            return None
        low, high = s.sparsity_range
        if s.allocation == "uniform":
            sizes = {n: lin.weight.numel() for n, lin in self.linears.items()}
            return exact_counts({n: s.sparsity for n in sizes}, sizes, s.sparsity, low, high, "uniform")
        allocation, outliers = owl_for_model(self.model, self.activations, s.sparsity, s.owl_m, s.owl_lambda, low, high)
        log.info("OWL allocation: block outlier ratios %s; layer sparsities %.3f to %.3f",
                 [round(o, 3) for o in outliers], min(allocation.ratios.values()), max(allocation.ratios.values()))
        return allocation

    def probe_statistics(self, layers: int = 3) -> list[dict[str, torch.Tensor]]:
        """Rows of this model's own statistics (first, middle and last prunable layer)."""
        names = list(self.linears)
        picks = [names[round(i * (len(names) - 1) / max(1, layers - 1))] for i in range(layers)]
        chosen = []
        for name in picks:
            g = self.gradients.get(name)
            factor = self.obs_factors.get(name)
            chosen.append({"W": self.linears[name].weight.detach().abs(), "X": self.activations[name],
                           "G": None if g is None else g.clone(),
                           "D": None if factor is None else d_of(torch.diagonal(factor))})
        return probes_from_layers(chosen)


class InProcessEvaluator(Evaluator):
    """Evaluates trees one after another in this process."""

    def __init__(self, settings: FitnessSettings, run_dir: str | Path, fitness: ModelFitness | None = None):
        self.fitness = fitness or ModelFitness(settings, run_dir)
        self.full_budget = settings.windows
        self.pattern = settings.pattern
        self.mask_group = settings.mask_group

    def probe_statistics(self) -> list[dict[str, torch.Tensor]]:
        return self.fitness.probe_statistics()

    def remember(self, mask_fitness: dict[str, float]) -> None:
        self.fitness.known_masks.update(mask_fitness)

    def evaluate(self, trees: Sequence[Tree], budget: int | None = None) -> list[FitnessResult]:
        out = []
        for tree in with_progress(trees):
            try:
                out.append(self.fitness.evaluate(tree, budget))
            except UserError:
                raise
            except Exception as e:  # a tree must never stop the search
                log.warning("tree %s failed: %s", tree, e)
                out.append(FitnessResult.worst(f"{type(e).__name__}: {e}"))
        return out
