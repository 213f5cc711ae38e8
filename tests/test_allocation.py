"""Layerwise allocation: exact global counts, ranges, OWL computed independently, files, bad input."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from prunerzero.cli import main
from prunerzero.errors import UserError
from prunerzero.models import decoder_layers, linear_layers, prunable_linears
from prunerzero.pruning.allocation import exact_counts, layer_sizes, load_allocation, owl, owl_for_model, uniform
from prunerzero.pruning.masks import Pattern, prune_count
from prunerzero.pruning.prune import prune_model
from prunerzero.pruning.stats import collect_activation_norms
from tests.conftest import local_data, tiny_llama, tiny_model_folder


@pytest.mark.parametrize("target", [0.5, 0.6, 0.7, 0.333])
def test_exact_global_count_on_odd_shapes(target):
    sizes = {"a": 7 * 13, "b": 5 * 11, "c": 3 * 17, "d": 1 * 9}
    ratios = {"a": target - 0.2, "b": target + 0.25, "c": target, "d": target + 0.1}
    alloc = exact_counts(ratios, sizes, target, 0.1, 0.9)
    assert alloc.total == round(target * sum(sizes.values()))
    for name, ratio in alloc.ratios.items():
        assert 0.1 - 1 / sizes[name] <= ratio <= 0.9 + 1e-12, (name, ratio)
    assert uniform(sizes, target).total == round(target * sum(sizes.values()))


def test_range_is_respected_and_an_impossible_one_refused():
    sizes = {f"l{i}": 100 for i in range(10)}
    ratios = {n: 0.1 * i for i, n in enumerate(sizes)}  # 0 .. 0.9
    alloc = exact_counts(ratios, sizes, 0.5, 0.4, 0.6)
    assert all(0.4 <= r <= 0.6 for r in alloc.ratios.values()) and alloc.total == 500
    with pytest.raises(UserError, match="cannot reach the target"):
        exact_counts(ratios, sizes, 0.7, 0.0, 0.6)
    with pytest.raises(UserError, match="not all finite"):
        exact_counts({**ratios, "l0": float("nan")}, sizes, 0.5)


def test_prune_count_spreads_over_rows_and_keeps_each_rows_ranking():
    scores = torch.rand(5, 8, generator=torch.Generator().manual_seed(0))
    mask = prune_count(scores, 17)
    assert int(mask.sum()) == 17 and mask.sum(1).tolist() == [4, 4, 3, 3, 3]
    for row, k in zip(range(5), mask.sum(1).tolist()):
        assert set(torch.argsort(scores[row], stable=True)[:k].tolist()) == set(mask[row].nonzero().flatten().tolist())
    whole = prune_count(scores, 17, "tensor")
    assert int(whole.sum()) == 17 and scores[whole].max() < scores[~whole].min()


def test_owl_ratios_match_an_independent_computation(windows):
    model = tiny_llama(layers=3)
    acts = collect_activation_norms(model, windows)
    target, m, lam = 0.6, 5.0, 0.08
    alloc, outliers = owl_for_model(model, acts, target, m, lam)
    # independently: per block, share of Wanda scores above m * mean, in %, then OWL's mapping
    names = {id(mod): n for n, mod in model.named_modules()}
    expected_outliers, per_block = [], []
    for block in decoder_layers(model):
        scores = torch.cat([(lin.weight.abs() * acts[names[id(lin)]].reshape(1, -1).sqrt()).flatten()
                            for lin in linear_layers(block).values()])
        expected_outliers.append(float((scores > m * scores.mean()).float().mean()) * 100)
    assert np.allclose(outliers, expected_outliers)
    r = np.array(expected_outliers)
    density = (r - r.min()) / (r.max() - r.min()) * 2 * lam
    per_block = 1 - (density - density.mean() + (1 - target))
    for b, block in enumerate(decoder_layers(model)):
        for lin in linear_layers(block).values():
            assert abs(alloc.ratios[names[id(lin)]] - per_block[b]) < 2 / lin.weight.numel() + 1e-3
    sizes = layer_sizes(model, list(prunable_linears(model)))
    assert alloc.total == round(target * sum(sizes.values()))
    assert max(per_block) - min(per_block) == pytest.approx(2 * lam)
    # pruning with it prunes exactly that many weights, each layer its own count
    prune_model(model, "wanda", target, Pattern(), windows=windows, allocation=alloc)
    zeros = {n: int((lin.weight == 0).sum()) for n, lin in prunable_linears(model).items()}
    assert zeros == alloc.counts


def test_allocation_file_round_trip_and_bad_files(tmp_path):
    sizes = {"a": 64, "b": 128, "c": 96}
    alloc = exact_counts({"a": 0.4, "b": 0.6, "c": 0.5}, sizes, 0.5)
    path = tmp_path / "alloc.json"
    path.write_text(json.dumps(alloc.to_json(0.5)))
    again = load_allocation(path, sizes, 0.5)
    assert again.counts == alloc.counts
    other = {"a": 64, "b": 128}
    with pytest.raises(UserError, match="has 3 layers, the model has 2"):
        load_allocation(path, other, 0.5)
    data = alloc.to_json(0.5)
    data["layers"]["a"] = float("nan")
    path.write_text(json.dumps(data))  # json.dumps writes NaN; strict reading refuses it
    with pytest.raises(UserError, match="not valid JSON"):
        load_allocation(path, sizes, 0.5)
    data["layers"]["a"] = "x"
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match="not a number"):
        load_allocation(path, sizes, 0.5)
    with pytest.raises(UserError, match="cannot reach"):
        owl([{"a": torch.rand(8, 8)}], {"a": 64}, 0.5, high=0.3)


def test_prune_cli_with_owl_and_its_file(tmp_path, capsys):
    model = str(tiny_model_folder(tmp_path / "m"))
    data = str(local_data(tmp_path / "d"))
    base = ["prune", "--model", model, "--data-dir", data, "--nsamples", "2", "--seqlen", "32", "--max-eval-windows", "1",
            "--method", "wanda", "--sparsity", "0.7"]
    assert main(base + ["--allocation", "owl", "--save-allocation", str(tmp_path / "owl.json"),
                        "--json", str(tmp_path / "out.json")]) == 0
    out = json.loads((tmp_path / "out.json").read_text())
    total = sum(l.weight.numel() for l in prunable_linears(tiny_llama()).values())
    assert out["pruned_weights"] == round(0.7 * total) == out["allocation"]["pruned_weights"]
    assert len(out["allocation"]["owl"]["block_outlier_ratios"]) == 2
    assert main(base + ["--allocation", str(tmp_path / "owl.json"), "--json", str(tmp_path / "again.json")]) == 0
    assert json.loads((tmp_path / "again.json").read_text())["layer_sparsity"] == out["layer_sparsity"]
    capsys.readouterr()
    for extra, word in ((["--allocation", "owl", "--pattern", "2:4", "--sparsity", "0.5"], "unstructured"),
                        (["--allocation", "nowhere.json"], "neither uniform"),
                        (["--allocation", "owl", "--sparsity-range", "0.8,0.9"], "cannot reach"),
                        (["--allocation", "owl", "--sparsity-range", "x"], "LOW,HIGH")):
        argv = base + extra if "--pattern" not in extra else [a for a in base if a not in ("--sparsity", "0.7")] + extra
        assert main(argv) == 2
        assert word in capsys.readouterr().err


def test_a_search_with_an_owl_allocation_resumes_exactly(tmp_path):
    import yaml

    from prunerzero.config import config_from_dict
    from prunerzero.runs import run_search

    model = str(tiny_model_folder(tmp_path / "m"))
    data = str(local_data(tmp_path / "d"))

    def cfg(root, generations):
        return config_from_dict({
            "name": "a", "output_dir": str(root), "seed": 2, "model": {"name": model, "device": "cpu"},
            "calibration": {"nsamples": 2, "seqlen": 32, "data_dir": data},
            "fitness": {"sparsity": 0.7, "seqlen": 32, "windows": 2,
                        "allocation": {"method": "owl", "m": 5, "lam": 0.08, "range": [0.5, 0.9]}},
            "search": {"population": 6, "generations": generations, "init_max_depth": 2}})

    full = run_search(cfg(tmp_path / "full", 3))
    run_search(cfg(tmp_path / "split", 1))
    resumed = run_search(cfg(tmp_path / "split", 3), resume=True)
    assert resumed.log == full.log and resumed.population == full.population
    saved = yaml.safe_load((tmp_path / "split" / "a" / "config.yaml").read_text())
    assert saved["fitness"]["allocation"]["method"] == "owl"
    state = json.loads((tmp_path / "split" / "a" / "state.json").read_text())
    assert state["fingerprint"]["fitness"]["allocation"] == "owl"
    # the OWL fitness differs from the uniform one for the same tree
    from prunerzero.fitness.model_fitness import ModelFitness
    from prunerzero.primitives.tree import Tree
    from prunerzero.runfolder import fitness_settings

    owl_settings = fitness_settings(cfg(tmp_path / "split", 3))
    plain = ModelFitness(dataclasses.replace(owl_settings, allocation=None), tmp_path / "split" / "a")
    with_owl = ModelFitness(owl_settings, tmp_path / "split" / "a")
    tree = Tree.parse("mul(W, sqrt(X))")
    assert with_owl.masks(tree).key() != plain.masks(tree).key()
    counts = {n: int(m.sum()) for n, m in with_owl.masks(tree).items()}
    assert counts == with_owl.allocation.counts
    with pytest.raises(UserError, match="cannot reach the target"):
        config_from_dict({"fitness": {"sparsity": 0.7, "allocation": {"range": [0.1, 0.6]}}})


def test_exact_counts_never_lower_a_layer_past_the_range_floor(monkeypatch):
    from prunerzero.errors import UserError
    from prunerzero.pruning import allocation

    # ratios that come out of the fit above what the target needs: the counts must come down, but
    # not below 80% of any layer (the range's floor); the exact total is then out of reach
    monkeypatch.setattr(allocation, "_fit_range", lambda r, s, target, low, high: r)
    with pytest.raises(UserError, match="cannot prune exactly"):
        allocation.exact_counts({"a": 0.9, "b": 0.9}, {"a": 100, "b": 100}, 0.5, 0.8, 0.95)
    fine = allocation.exact_counts({"a": 0.9, "b": 0.9}, {"a": 100, "b": 100}, 0.85, 0.8, 0.95)
    assert fine.total == 170 and min(fine.counts.values()) >= 80
