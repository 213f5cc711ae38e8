"""Searched allocation functions: features, OWL and uniform as functions, a search that resumes
exactly and exports an allocation file that prune loads, and bad input."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from prunerzero.cli import main
from prunerzero.config import config_from_dict
from prunerzero.errors import UserError
from prunerzero.fitness.allocation_fitness import AllocationEvaluator, allocation_of, layer_features
from prunerzero.fitness.model_fitness import ModelFitness
from prunerzero.models import prunable_linears
from prunerzero.primitives.deap_set import primitive_set
from prunerzero.primitives.known import resolve_tree
from prunerzero.primitives.tree import Tree
from prunerzero.pruning.allocation import exact_counts, load_allocation, owl_for_model
from prunerzero.pruning.stats import collect_activation_norms
from prunerzero.runfolder import fitness_settings
from prunerzero.runs import run_search
from tests.conftest import local_data, tiny_llama, tiny_model_folder

WANDA = Tree.parse("mul(abs(W), sqrt(X))")


def wanda_features(model, acts):
    def score(name, lin):
        return WANDA.evaluate({"W": lin.weight.abs(), "X": acts[name].reshape(1, -1)}, lin.weight.shape)
    return layer_features(model, score_fn=score)


def test_features_of_a_tiny_model(windows):
    model = tiny_llama(layers=3)
    acts = collect_activation_norms(model, windows)
    f = wanda_features(model, acts)
    names = list(prunable_linears(model))
    assert all(v.shape == (len(names),) and v.dtype == torch.float64 for v in f.values())
    per_block = len(names) // 3
    assert f["D"].tolist() == [b / 2 for b in range(3) for _ in range(per_block)]
    assert f["T"].tolist() == [float("self_attn" in n) for n in names]
    for b in range(3):  # the block's outlier ratio is shared by its layers
        assert len(set(f["B"][b * per_block:(b + 1) * per_block].tolist())) == 1
    assert ((f["E"] > 0) & (f["E"] <= 1)).all() and (f["S"] > 0).all()
    # mean |score| of one layer, computed independently
    lin = prunable_linears(model)[names[4]]
    expected = (lin.weight.abs() * acts[names[4]].reshape(1, -1).sqrt()).double().mean()
    assert torch.isclose(f["M"][4], expected)


def test_owl_and_uniform_are_allocation_functions(windows):
    model = tiny_llama(layers=3)
    acts = collect_activation_norms(model, windows)
    f = wanda_features(model, acts)
    sizes = {n: lin.weight.numel() for n, lin in prunable_linears(model).items()}
    owl, _ = owl_for_model(model, acts, 0.7, 5.0, 0.08)
    assert allocation_of(Tree.parse("B"), f, sizes, 0.7, 0.08).counts == owl.counts
    flat = allocation_of(Tree.parse("sub(D, D)"), f, sizes, 0.7, 0.08)
    assert flat.counts == exact_counts(dict.fromkeys(sizes, 0.7), sizes, 0.7).counts
    deep = allocation_of(Tree.parse("D"), f, sizes, 0.7, 0.08)  # deeper layers keep more weights
    assert deep.total == owl.total == round(0.7 * sum(sizes.values()))
    first, last = list(sizes)[0], list(sizes)[-1]
    assert deep.ratios[first] > 0.7 > deep.ratios[last]
    # NaN in a metric's scores (an overflowing metric): one line, before anything is pruned
    with pytest.raises(UserError, match="not finite numbers"):
        layer_features(model, score_fn=lambda name, lin: torch.full_like(lin.weight, float("nan")))


def allocation_config(root, model, data, generations, **search):
    return config_from_dict({
        "name": "alloc", "output_dir": str(root), "seed": 4, "model": {"name": model, "device": "cpu"},
        "calibration": {"nsamples": 2, "seqlen": 32, "data_dir": data},
        "fitness": {"sparsity": 0.7, "seqlen": 32, "windows": 2,
                    "allocation": {"method": "searched", "lam": 0.1, "range": [0.3, 0.95]}},
        "search": {"space": "allocation", "metric": "wanda", "terminals": ["D", "T", "B", "O", "M", "S", "E"],
                   "operators": ["add", "sub", "mul", "div", "sqrt", "log", "mms"], "population": 6,
                   "generations": generations, "init_max_depth": 2, **search}})


def test_an_allocation_search_resumes_exactly_and_exports_a_file_prune_loads(tmp_path):
    model = str(tiny_model_folder(tmp_path / "m"))
    data = str(local_data(tmp_path / "d"))
    full = run_search(allocation_config(tmp_path / "full", model, data, 3))
    run_search(allocation_config(tmp_path / "split", model, data, 1))
    resumed = run_search(allocation_config(tmp_path / "split", model, data, 3), resume=True)
    assert resumed.log == full.log and resumed.population == full.population and resumed.cache == full.cache
    assert "B" in {r["tree"] for r in full.cache.values()}  # OWL is seeded
    for r in full.cache.values():
        assert Tree.parse(r["tree"]).terminals <= set("DTBOMSE")
    path = tmp_path / "full" / "alloc" / "allocation.json"
    data_out = json.loads(path.read_text())
    assert data_out["format"] == "prunerzero-allocation" and data_out["function"] == full.hall_of_fame(1)[0]["tree"]
    assert data_out["fitness"] == full.hall_of_fame(1)[0]["fitness"]
    assert set(data_out["reference"]) == {"uniform", "owl"}
    assert data_out["reference"]["owl"] == full.cache[next(k for k, r in full.cache.items() if r["tree"] == "B")]["fitness"]
    assert main(["heldout", str(tmp_path / "full" / "alloc")]) == 2  # metrics only: one line pointing to prune
    assert main(["report", str(tmp_path / "full" / "alloc")]) == 0  # the report shows it, with its plot
    page = (tmp_path / "full" / "alloc" / "report.html").read_text()
    assert "Layerwise allocation" in page and data_out["function"] in page
    assert (tmp_path / "full" / "alloc" / "allocation.png").stat().st_size > 10_000
    sizes = {n: lin.weight.numel() for n, lin in prunable_linears(tiny_llama()).items()}
    assert load_allocation(path, sizes, 0.7, 0.3, 0.95).total == round(0.7 * sum(sizes.values()))
    argv = ["prune", "--model", model, "--data-dir", data, "--nsamples", "2", "--seqlen", "32", "--max-eval-windows",
            "1", "--method", "wanda", "--sparsity", "0.7", "--allocation", str(path), "--sparsity-range", "0.3,0.95",
            "--json", str(tmp_path / "out.json")]
    assert main(argv) == 0
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["pruned_weights"] == round(0.7 * sum(sizes.values()))
    assert out["layer_sparsity"] == pytest.approx(data_out["layers"], abs=1e-9)
    # the run's function at another target: `prunerzero allocate`
    run = str(tmp_path / "full" / "alloc")
    assert main(["allocate", run, "--sparsity", "0.7", "--out", str(tmp_path / "a70.json")]) == 0
    assert json.loads((tmp_path / "a70.json").read_text())["layers"] == data_out["layers"]
    assert main(["allocate", run, "--sparsity", "0.5", "--out", str(tmp_path / "a50.json")]) == 0
    a50 = json.loads((tmp_path / "a50.json").read_text())
    assert a50["target"] == 0.5 and a50["found_at"] == 0.7 and a50["function"] == data_out["function"]
    assert a50["function_from"] == "the run's best"
    assert main(["allocate", run, "--sparsity", "0.5", "--function", "D", "--out", str(tmp_path / "d50.json")]) == 0
    d50 = json.loads((tmp_path / "d50.json").read_text())
    assert d50["function_from"] == "given" and d50["function"] == "D"
    first, last = list(sizes)[0], list(sizes)[-1]
    assert d50["layers"][first] > 0.5 > d50["layers"][last]  # deeper layers keep more weights
    assert a50["pruned_weights"] == round(0.5 * sum(sizes.values()))
    # OWL's mapping is a shift of the same shape (no layer meets the range here): same moves around the target
    moves = {n: r - 0.5 for n, r in a50["layers"].items()}
    assert moves == pytest.approx({n: r - 0.7 for n, r in data_out["layers"].items()}, abs=2e-3)
    for bad in (["--sparsity", "0.99"], ["--sparsity", "0.5", "--function", "mul(W, D)"],
                ["--sparsity", "0.5", "--out", str(path)]):
        argv = ["allocate", run, *bad] + ([] if "--out" in bad else ["--out", str(tmp_path / "bad.json")])
        assert main(argv) == 2, bad
    assert not (tmp_path / "bad.json").exists()
    metric_run = config_from_dict({"name": "metric-run", "output_dir": str(tmp_path), "search": {"population": 4, "generations": 1},
                                   "evaluator": {"type": "reconstruction"}})
    run_search(metric_run)
    assert main(["allocate", str(tmp_path / "metric-run"), "--sparsity", "0.5", "--out", str(tmp_path / "bad.json")]) == 2


def test_the_fitness_of_a_searched_allocation_is_that_of_its_counts(tmp_path):
    model = str(tiny_model_folder(tmp_path / "m"))
    data = str(local_data(tmp_path / "d"))
    cfg = allocation_config(tmp_path, model, data, 1)
    fit = ModelFitness(fitness_settings(cfg), tmp_path / "run")
    ev = AllocationEvaluator(fit, WANDA, 0.1, 5.0, (0.3, 0.95))
    tree = Tree.parse("mul(D, O)")
    (r,) = ev.evaluate([tree])
    fit.allocation = ev.allocation(tree)
    assert fit.evaluate(WANDA).fitness == r.fitness
    fit.allocation = None
    # and the counts are what is measured: every layer at the target is another fitness
    sizes = ev.sizes
    fit.allocation = exact_counts(dict.fromkeys(sizes, 0.7), sizes, 0.7, 0.3, 0.95)
    assert fit.evaluate(WANDA).fitness != r.fitness
    fit.allocation = None
    assert ev.same_ranking(Tree.parse("mul(D, O)"), Tree.parse("mul(O, D)"))
    assert not ev.same_ranking(Tree.parse("D"), Tree.parse("O"))


@pytest.mark.parametrize("change, message", [
    ({"search": {"terminals": ["W", "D"]}}, "subset of D, T"),
    ({"search": {"operators": ["add", "rown"]}}, "rows or columns"),
    ({"search": {"metric": "mul(B, W)"}}, "allocation function, not a metric"),
    ({"search": {"metric": "mul(D, W)"}}, "only inside the OBS update"),
    ({"search": {"metric": "sparsegpt"}, "fitness": {"update": "obs", "stats_mode": "sequential"}},
     "stats_mode: once"),
    ({"search": {"metric": "root4-w-minus-x-colnormed-obs-2of4"}}, "records update: obs"),
    ({"search": {"metric": "no-such-metric"}}, "not a known metric"),
    ({"fitness": {"allocation": None}}, "needs fitness.allocation"),
    ({"fitness": {"allocation": {"method": "owl"}}}, "choose one of searched"),
    ({"evaluator": {"type": "ray"}}, "in-process only"),
    ({"heldout": {"top_k": 1}}, "prune --allocation"),
])
def test_bad_allocation_search_configs_get_one_line(change, message):
    base = {"fitness": {"sparsity": 0.7, "allocation": {"method": "searched"}},
            "search": {"space": "allocation", "terminals": ["D", "O"], "operators": ["add", "mul"]}}
    for section, values in change.items():
        base[section] = values if values is None else {**base.get(section, {}), **values}
    with pytest.raises(UserError, match=message):
        config_from_dict(base)


def test_an_allocation_function_is_refused_as_a_metric():
    with pytest.raises(UserError, match="allocation function, not a metric"):
        resolve_tree("mul(W, B)")
    assert resolve_tree("mul(W, D)").terminals == {"W", "D"}  # D of a metric: 1 / [H^-1]_jj, for update: obs
    with pytest.raises(UserError, match="exists only inside the OBS update: set fitness.update: obs"):
        config_from_dict({"search": {"space": "metric", "terminals": ["W", "D"]}})
    with pytest.raises(UserError, match="subset of W, G, X for search.space: metric"):
        config_from_dict({"search": {"space": "metric", "terminals": ["W", "B"]}})
    with pytest.raises(UserError, match="mixes weight statistics"):
        primitive_set(["add"], ["W", "B"])
    assert "D" in primitive_set(["add"], ["W", "D"]).mapping  # the OBS update's D is a metric's terminal


def test_an_allocation_search_in_sequential_mode(tmp_path):
    """The reference procedure (X re-collected on the partly pruned model) scores allocations as the
    held-out pruning does; the search runs with it and its fitness is that of sequential pruning."""
    model = str(tiny_model_folder(tmp_path / "m"))
    data = str(local_data(tmp_path / "d"))
    raw = allocation_config(tmp_path / "runs", model, data, 1).to_dict()
    raw["fitness"]["stats_mode"] = "sequential"
    raw["search"].update(population=4)
    cfg = config_from_dict(raw)
    state = run_search(cfg)
    owl = next(r for r in state.cache.values() if r["tree"] == "B")
    fit = ModelFitness(fitness_settings(cfg), tmp_path / "runs" / "alloc")
    ev = AllocationEvaluator(fit, WANDA, 0.1, 5.0, (0.3, 0.95))
    fit.allocation = ev.allocation(Tree.parse("B"))
    assert fit.evaluate(WANDA).fitness == owl["fitness"]
    once = ModelFitness(dataclasses.replace(fitness_settings(cfg), stats_mode="once"), tmp_path / "runs" / "alloc")
    once.allocation = fit.allocation
    assert once.evaluate(WANDA).fitness != owl["fitness"]  # the two procedures prune differently


def test_an_allocation_search_inside_the_obs_update(tmp_path):
    """``fitness.update: obs``: the fixed metric is a rule inside SparseGPT's update (here SparseGPT
    itself, reading D); features score the dense model with D from the run's factors, and an
    allocation's fitness is that of the reconstructed model with its per-layer counts."""
    model = str(tiny_model_folder(tmp_path / "m"))
    data = str(local_data(tmp_path / "d"))
    raw = allocation_config(tmp_path / "runs", model, data, 1).to_dict()
    raw["fitness"]["update"] = "obs"
    raw["search"].update(population=4, metric="sparsegpt")
    cfg = config_from_dict(raw)
    state = run_search(cfg)
    run = tmp_path / "runs" / "alloc"
    fit = ModelFitness(fitness_settings(cfg), run)
    sparsegpt = resolve_tree("sparsegpt")
    ev = AllocationEvaluator(fit, sparsegpt, 0.1, 5.0, (0.3, 0.95))
    name, lin = next(iter(fit.linears.items()))  # M: mean score of the first layer, computed by hand
    d = 1.0 / torch.diagonal(fit.obs_factors[name].float())
    assert torch.isclose(ev.features["M"][0], (lin.weight.abs() * d).square().double().mean())
    owl = next(r for r in state.cache.values() if r["tree"] == "B")
    fit.allocation = ev.allocation(Tree.parse("B"))
    assert fit.evaluate(sparsegpt).fitness == owl["fitness"]
    masks_only = ModelFitness(dataclasses.replace(fitness_settings(cfg), update="none"), run)
    masks_only.allocation = fit.allocation
    assert masks_only.evaluate(WANDA).fitness != owl["fitness"]
    written = json.loads((run / "allocation.json").read_text())
    assert written["update"] == "obs" and written["metric"] == str(sparsegpt)
