"""Fitness with the weight update (``fitness.update: obs``): the tree picks each block's mask inside
SparseGPT's reconstruction, and the fitness is the perplexity of the reconstructed model.

Statistics modes, as for metrics:
- ``once``: every layer's inverse-Hessian factor is computed once per run from the dense model and
  stored in the run folder beside X and G (safetensors, memory-mapped on load); a candidate pays
  the column updates of every layer and the fitness forward pass.
- ``sequential``: the reference procedure; each block's Hessians come from the partly pruned and
  reconstructed model, so a candidate pays a calibration pass and the updates.

The dense weights are never copied: a candidate's layers are new tensors swapped in for the
forward pass and the dense ones swapped back after it, whatever happens in between.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunerzero.primitives.tree import Tree
from prunerzero.pruning.allocation import Allocation
from prunerzero.pruning.masks import PackedMasks, Pattern
from prunerzero.pruning.obs import PERCDAMP, obs_update
from prunerzero.pruning.stats import cache_key, collect_dense_statistics, load_tensors_mapped, save_tensors_atomic

log = logging.getLogger(__name__)


def obs_factors_path(calibration_key: dict[str, Any], run_dir: str | Path, model_fingerprint: str) -> Path:
    """Where a run keeps its layers' OBS factors for this calibration (beside X and G)."""
    key = cache_key(kind="obs-factors", percdamp=PERCDAMP, model=model_fingerprint, **calibration_key)
    return Path(run_dir) / f"obs-factors-{key}.safetensors"


def prepare_obs_factors(model: nn.Module, windows_of: Any, path: Path, model_name: str) -> Mapping[str, torch.Tensor]:
    """The dense model's OBS factors: loaded (memory-mapped) if the run has them, else computed from
    the calibration windows (``windows_of()`` is called only then) and stored atomically."""
    if path.is_file():
        return load_tensors_mapped(path)
    _, factors = collect_dense_statistics(model, windows_of(), obs_factors=True)
    save_tensors_atomic(factors, path, metadata={"model": model_name})
    log.info("OBS factors of %d layers stored in %s", len(factors) // 2, path)
    return load_tensors_mapped(path)


def run_obs_factors(model: nn.Module, tokenizer: Any, source: Any, settings: Any,
                    run_dir: str | Path) -> Mapping[str, torch.Tensor]:
    """A run's OBS factors when its fitness needs them (``update: obs`` with ``stats_mode: once``),
    else an empty mapping. ``settings``: the run's ``FitnessSettings``."""
    if settings.update != "obs" or settings.stats_mode != "once":
        return {}
    path = obs_factors_path(settings.calibration.statistics_key(), run_dir, source.fingerprint)
    return prepare_obs_factors(model, lambda: settings.calibration.windows(tokenizer), path, settings.model)


def obs_layers(linears: Mapping[str, nn.Linear], tree: Tree, sparsity: float, pattern: Pattern,
               factors: Mapping[str, torch.Tensor], activations: Mapping[str, torch.Tensor],
               gradients: Mapping[str, torch.Tensor], allocation: Allocation | None, scope: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, reconstructed weight) of each layer, one at a time, from the dense weights and the
    run's factors (the ``once`` mode). A block the tree cannot rank raises ``UnrankableLayer``."""
    uses = tree.terminals
    for name, lin in linears.items():
        ratio = sparsity if allocation is None else allocation.ratios[name]
        new = obs_update(lin.weight.data, factors[name].float(), factors[name + ".dead"].bool(), ratio, pattern, tree,
                         x=activations.get(name) if "X" in uses else None,
                         g=gradients.get(name) if "G" in uses else None, scope=scope, name=name)
        yield name, new


@contextmanager
def swapped_weights(linears: Mapping[str, nn.Linear]) -> Iterator[dict[str, torch.Tensor]]:
    """Inside the block, assign ``linears[name].weight.data = new`` freely; on leaving, every layer
    gets its own dense tensor back (they were never written to)."""
    dense = {name: lin.weight.data for name, lin in linears.items()}
    try:
        yield dense
    finally:
        for name, weight in dense.items():
            linears[name].weight.data = weight


def zero_pattern(linears: Mapping[str, nn.Linear]) -> PackedMasks:
    """The zeros of each layer's current weight, packed: what the mask cache keys a reconstruction by
    (the update is deterministic given the masks it picked, and its zeros are those masks)."""
    return PackedMasks.of({name: lin.weight.data == 0 for name, lin in linears.items()})
