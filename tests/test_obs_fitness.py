"""Fitness with the weight update (``fitness.update: obs``): the OBS factors cached once per run, the
fitness equal to pruning the model with the update and measuring it, the dense model untouched."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from prunerzero.config import config_from_dict
from prunerzero.errors import UserError
from prunerzero.fitness import obs_fitness
from prunerzero.fitness.model_fitness import FitnessSettings, ModelFitness
from prunerzero.models import prunable_linears
from prunerzero.primitives.tree import Tree
from prunerzero.pruning.calibration import Calibration
from prunerzero.pruning.masks import Pattern
from prunerzero.pruning.obs import SPARSEGPT_TREE, obs_prune
from prunerzero.pruning.prune import prune_model
from prunerzero.pruning.stats import collect_dense_statistics
from prunerzero.runfolder import fitness_settings
from prunerzero.runs import fingerprint
from tests.conftest import tiny_llama
from tests.test_fitness import CharTokenizer

CALIB = Calibration(nsamples=4, seqlen=32)
SRC = SimpleNamespace(fingerprint="tiny-test")


def obs_settings(**kw) -> FitnessSettings:
    return FitnessSettings(model="tiny", calibration=CALIB, seqlen=32, windows=2, update="obs", **kw)


def dense_copy(model) -> dict[str, torch.Tensor]:
    return {n: lin.weight.detach().clone() for n, lin in prunable_linears(model).items()}


def test_once_mode_is_the_update_of_every_layer_from_the_dense_hessians(tmp_path):
    model = tiny_llama()
    before = dense_copy(model)
    fitness = ModelFitness(obs_settings(), tmp_path, model, CharTokenizer(), SRC)
    got = fitness.evaluate(SPARSEGPT_TREE)
    assert got.reason is None and math.isfinite(got.fitness)
    # the dense model is back, bit for bit
    assert all(torch.equal(lin.weight, before[n]) for n, lin in prunable_linears(model).items())
    # the same number by hand: each layer reconstructed from the dense model's own Hessian
    hessians = {}
    from prunerzero.pruning.layerwise import iterate_blocks

    names = {id(m): n for n, m in model.named_modules()}

    def keep(_i, linears, stats):
        for short, lin in linears.items():
            hessians[names[id(lin)]] = stats[short].hessian.clone()
        return False

    iterate_blocks(model, CALIB.windows(CharTokenizer()), keep, hessian=True)
    for name, lin in prunable_linears(model).items():
        lin.weight.data = obs_prune(before[name], hessians[name], 0.5, Pattern())
    assert fitness.forward_loss() == pytest.approx(got.fitness, rel=1e-5)
    for name, lin in prunable_linears(model).items():
        lin.weight.data = before[name]


def test_the_factors_are_computed_once_per_run_and_read_back(tmp_path, monkeypatch):
    model = tiny_llama()
    first = ModelFitness(obs_settings(), tmp_path, model, CharTokenizer(), SRC)
    files = list(tmp_path.glob("obs-factors-*.safetensors"))
    assert len(files) == 1
    calls = []
    monkeypatch.setattr(obs_fitness, "collect_dense_statistics",
                        lambda *a, **k: calls.append(1) or collect_dense_statistics(*a, **k))
    again = ModelFitness(obs_settings(), tmp_path, model, CharTokenizer(), SRC)  # a resumed run, a Ray worker
    assert calls == [] and list(tmp_path.glob("obs-factors-*.safetensors")) == files
    for name in first.obs_factors:
        assert torch.equal(first.obs_factors[name], again.obs_factors[name])
    tree = Tree.parse("mul(W, sqrt(X))")
    assert first.evaluate(tree).fitness == again.evaluate(tree).fitness


def test_sequential_mode_is_prune_model_with_the_update(tmp_path):
    model = tiny_llama()
    before = dense_copy(model)
    fitness = ModelFitness(obs_settings(stats_mode="sequential"), tmp_path, model, CharTokenizer(), SRC)
    assert list(tmp_path.glob("obs-factors-*")) == []  # nothing cached: each candidate recomputes
    got = fitness.evaluate(SPARSEGPT_TREE)
    assert all(torch.equal(lin.weight, before[n]) for n, lin in prunable_linears(model).items())
    prune_model(model, "sparsegpt", 0.5, Pattern(), windows=CALIB.windows(CharTokenizer()))
    assert fitness.forward_loss() == pytest.approx(got.fitness, rel=1e-5)


def test_a_rule_that_cannot_rank_a_block_gets_the_worst_fitness_with_its_reason(tmp_path):
    model = tiny_llama()
    before = dense_copy(model)
    fitness = ModelFitness(obs_settings(), tmp_path, model, CharTokenizer(), SRC)
    res = fitness.evaluate(Tree.parse("sub(D, D)"))
    assert res.fitness >= 1e9 and "input columns" in res.reason and "one value" in res.reason
    assert all(torch.equal(lin.weight, before[n]) for n, lin in prunable_linears(model).items())


def test_twin_rules_hit_the_mask_cache(tmp_path):
    fitness = ModelFitness(obs_settings(), tmp_path, tiny_llama(), CharTokenizer(), SRC)
    first = fitness.evaluate(SPARSEGPT_TREE)
    twin = fitness.evaluate(Tree.parse("mul(W, D)"))  # the square root of SparseGPT's saliency: same masks
    assert twin.cached == "mask" and twin.fitness == first.fitness
    other = fitness.evaluate(Tree.parse("W"))
    assert other.cached is None and other.fitness != first.fitness


def test_config_takes_the_update_and_keeps_old_fingerprints():
    plain = config_from_dict({})
    assert "update" not in fingerprint(plain)["fitness"]  # runs written before resume unchanged
    obs = config_from_dict({"fitness": {"update": "obs"}, "search": {"terminals": ["W", "X", "D"],
                                                                      "seed_trees": ["sqr(mul(W, D))"]}})
    assert fitness_settings(obs).update == "obs" and fingerprint(obs)["fitness"]["update"] == "obs"
    with pytest.raises(UserError, match="D .* exists only inside the OBS update: set fitness.update: obs"):
        config_from_dict({"search": {"terminals": ["W", "X", "D"]}})
    with pytest.raises(UserError, match="fitness.update: unknown 'osb'; did you mean 'obs'"):
        config_from_dict({"fitness": {"update": "osb"}})
    with pytest.raises(UserError, match="not reconstruction"):
        config_from_dict({"fitness": {"update": "obs"}, "evaluator": {"type": "reconstruction"}})
