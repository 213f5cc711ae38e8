"""fitness.settings: several (sparsity, pattern, allocation) scored at once, as the geometric mean of
perplexity ratios to the reference metric."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from prunerzero.config import config_from_dict
from prunerzero.errors import UserError
from prunerzero.fitness.model_fitness import FitnessSettings, ModelFitness
from prunerzero.fitness.multi_setting import MultiSettingEvaluator, settings_for
from prunerzero.primitives.known import KNOWN_METRICS
from prunerzero.primitives.tree import Tree
from prunerzero.pruning.calibration import Calibration
from prunerzero.runs import fingerprint, run_search
from prunerzero.search import checkpoint as ckpt
from tests.conftest import local_data, tiny_llama, tiny_model_folder
from tests.test_fitness import CharTokenizer

BASE = FitnessSettings(model="tiny", calibration=Calibration(nsamples=2, seqlen=32), seqlen=32, windows=2)
SRC = SimpleNamespace(fingerprint="tiny-test")
ENTRIES = [{"sparsity": 0.5}, {"pattern": "2:4"}, {"sparsity": 0.7, "allocation": "owl"}]


def test_the_fitness_is_the_geometric_mean_of_the_ratios_measured_one_by_one(tmp_path):
    model, tokenizer = tiny_llama(), CharTokenizer()
    settings = settings_for(BASE, ENTRIES)
    assert [(s.sparsity, s.pattern, s.allocation) for s in settings] == [
        (0.5, "unstructured", None), (0.5, "2:4", None), (0.7, "unstructured", "owl")]
    wanda = KNOWN_METRICS["wanda"].tree
    ev = MultiSettingEvaluator(settings, tmp_path / "multi", wanda, model=model, tokenizer=tokenizer, source=SRC)
    # Not sqr(W) * X: it is (|W| sqrt(X))^2, Wanda's own ranking, so its masks (and ratio 1) are Wanda's
    trees = [Tree.parse("mul(W, X)"), Tree.parse("W"), wanda]
    got = [r.fitness for r in ev.evaluate(trees)]
    for tree, value in zip(trees, got):
        logs = []
        for s in settings:  # each setting on a fitness of its own
            alone = ModelFitness(s, tmp_path / "alone", model, tokenizer, SRC)
            logs.append(math.log(alone.evaluate(tree).fitness / alone.evaluate(wanda).fitness))
        assert value == pytest.approx(math.exp(sum(logs) / len(logs)), rel=1e-6), tree
    assert got[2] == pytest.approx(1.0)  # the reference is 1 everywhere
    assert got[0] != got[2] and got[1] != got[2]  # other metrics are not the reference
    bad = ev.evaluate([Tree.parse("sub(W, W)")])[0]
    assert bad.fitness >= 1e9 and bad.reason.startswith("setting 0.5 unstructured:")


def test_config_settings_are_checked_and_fingerprinted():
    cfg = config_from_dict({"fitness": {"settings": ENTRIES}})
    fp = fingerprint(cfg)["fitness"]
    assert fp["settings"][1] == {"pattern": "2:4"} and fp["reference"] == "mul(abs(W), sqrt(X))"
    assert "settings" not in fingerprint(config_from_dict({}))["fitness"]  # old runs resume unchanged
    assert "over 3 settings" in ckpt.fitness_label({"fitness": fp})
    for settings, message in (([], "non-empty list"),
                              ([{"sparsty": 0.7}], r"unknown key fitness.settings\[0\].sparsty; did you mean 'sparsity'"),
                              ([{"sparsity": 1.5}], "outside"),
                              ([{"pattern": "2:4", "allocation": "owl"}], "needs unstructured"),
                              ([{"allocation": "owls"}], "did you mean 'owl'")):
        with pytest.raises(UserError, match=message):
            config_from_dict({"fitness": {"settings": settings}})
    with pytest.raises(UserError, match="in-process for now"):
        config_from_dict({"fitness": {"settings": ENTRIES}, "evaluator": {"type": "ray"}})


def test_a_search_over_two_settings_runs_resumes_and_exports(tmp_path):
    model = str(tiny_model_folder(tmp_path / "m"))
    data = str(local_data(tmp_path / "d"))
    raw = {"name": "multi", "output_dir": str(tmp_path), "seed": 1, "model": {"name": model, "device": "cpu"},
           "calibration": {"nsamples": 2, "seqlen": 32, "data_dir": data},
           "fitness": {"seqlen": 32, "windows": 2, "settings": [{"sparsity": 0.5}, {"pattern": "2:4"}]},
           "search": {"population": 4, "generations": 1, "terminals": ["W", "X"], "init_max_depth": 2}}
    state = run_search(config_from_dict(raw))
    wanda = state.fitness_of("mul(abs(W), sqrt(X))")
    assert wanda == pytest.approx(1.0)  # seeded, and the reference of its own ratio
    resumed = run_search(config_from_dict(raw), resume=True, generations=2)
    assert resumed.generation == 2 and resumed.fitness_of("mul(abs(W), sqrt(X))") == wanda
