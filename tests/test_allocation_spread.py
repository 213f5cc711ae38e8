"""benchmarks/allocation_spread.py: one allocation function scored at several lambdas on a config's
own fitness text, each lambda recorded once, and the chosen spread written as an allocation file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from prunerzero.config import load_config
from prunerzero.fitness.allocation_fitness import AllocationEvaluator
from prunerzero.fitness.model_fitness import ModelFitness
from prunerzero.models import prunable_linears
from prunerzero.pruning.allocation import exact_counts, load_allocation
from prunerzero.primitives.tree import Tree
from prunerzero.runfolder import fitness_settings
from tests.conftest import local_data, tiny_llama, tiny_model_folder

ROOT = Path(__file__).resolve().parent.parent
WANDA = Tree.parse("mul(abs(W), sqrt(X))")
FUNCTION = "D"  # deeper layers keep more weights


def spread(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "allocation_spread.py"), *args],
                          capture_output=True, text=True, cwd=ROOT)


def test_each_lambda_is_the_fitness_of_its_allocation_and_is_measured_once(tmp_path):
    config = tmp_path / "alloc.yaml"
    config.write_text(yaml.safe_dump({
        "name": "alloc", "output_dir": str(tmp_path / "runs"), "seed": 4,
        "model": {"name": str(tiny_model_folder(tmp_path / "m")), "device": "cpu"},
        "calibration": {"nsamples": 2, "seqlen": 32, "data_dir": str(local_data(tmp_path / "d"))},
        "fitness": {"sparsity": 0.7, "seqlen": 32, "windows": 2,
                    "allocation": {"method": "searched", "lam": 0.1, "range": [0.3, 0.95]}},
        "search": {"space": "allocation", "metric": "wanda", "terminals": ["D", "T", "B", "O", "M", "S", "E"]}}))
    out = tmp_path / "spread.json"
    done = spread(str(config), "--function", FUNCTION, "--lambdas", "0,0.1", "--out", str(out))
    assert done.returncode == 0, done.stderr
    record = json.loads(out.read_text())
    assert set(record["by_lambda"]) == {"0", "0.1"} and record["metric"] == "wanda"
    assert "--lambdas 0,0.1" in record["by_lambda"]["0.1"]["command"]

    # measured independently in this process: lambda 0 is the uniform allocation, 0.1 the function's
    cfg = load_config(config)
    fit = ModelFitness(fitness_settings(cfg), tmp_path / "check")
    sizes = {n: lin.weight.numel() for n, lin in fit.linears.items()}
    fit.allocation = exact_counts(dict.fromkeys(sizes, 0.7), sizes, 0.7, 0.3, 0.95)
    assert record["by_lambda"]["0"]["fitness"] == fit.evaluate(WANDA).fitness
    fit.allocation = None
    at_01 = AllocationEvaluator(fit, WANDA, 0.1, 5.0, (0.3, 0.95))
    assert record["by_lambda"]["0.1"]["fitness"] == at_01.evaluate([Tree.parse(FUNCTION)])[0].fitness
    assert record["by_lambda"]["0"]["fitness"] != record["by_lambda"]["0.1"]["fitness"]
    assert record["by_lambda"]["0"]["max_sparsity"] - record["by_lambda"]["0"]["min_sparsity"] < 1e-3
    assert record["by_lambda"]["0.1"]["max_sparsity"] - record["by_lambda"]["0.1"]["min_sparsity"] > 0.15

    # a re-run measures only what is new
    again = spread(str(config), "--function", FUNCTION, "--lambdas", "0,0.1,0.2", "--out", str(out))
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("already measured, skipped") == 2
    assert set(json.loads(out.read_text())["by_lambda"]) == {"0", "0.1", "0.2"}

    # the chosen spread as a file prune --allocation loads
    alloc = tmp_path / "alloc-01.json"
    wrote = spread(str(config), "--function", FUNCTION, "--out", str(out), "--write", "0.1",
                   "--allocation-out", str(alloc), "--run", "allocation-70-sequential")
    assert wrote.returncode == 0, wrote.stderr
    data = json.loads(alloc.read_text())
    assert data["function_from"] == "given" and data["lambda"] == 0.1 and data["run"] == "allocation-70-sequential"
    assert data["fitness"] == record["by_lambda"]["0.1"]["fitness"]
    assert data["layers"] == at_01.allocation(Tree.parse(FUNCTION)).ratios
    model_sizes = {n: lin.weight.numel() for n, lin in prunable_linears(tiny_llama()).items()}
    assert load_allocation(alloc, model_sizes, 0.7, 0.3, 0.95).total == round(0.7 * sum(model_sizes.values()))

    # an allocation file stretched: at its own lambda it is the file, at twice it the function at twice
    from_file = tmp_path / "from-file.json"
    done = spread(str(config), "--allocation-file", str(alloc), "--lambdas", "0.1,0.2", "--out", str(from_file))
    assert done.returncode == 0, done.stderr
    by_file = json.loads(from_file.read_text())["by_lambda"]
    assert by_file["0.1"]["fitness"] == record["by_lambda"]["0.1"]["fitness"]
    assert by_file["0.2"]["min_sparsity"] == pytest.approx(json.loads(out.read_text())["by_lambda"]["0.2"]["min_sparsity"],
                                                           abs=1e-3)
    assert by_file["0.2"]["max_sparsity"] - by_file["0.2"]["min_sparsity"] > 0.3

    # bad input: one line, status 2, nothing written
    for bad, message in ((["--lambdas", "1.5"], "must each be in [0, 1)"),
                         (["--lambdas", "a,b"], "numbers separated by commas"),
                         (["--out", str(tmp_path / "other.json"), "--write", "0.1"], "needs --allocation-out")):
        argv = [str(config), "--function", FUNCTION, "--out", str(tmp_path / "bad.json"), *bad]
        failed = spread(*argv)
        assert failed.returncode == 2 and message in failed.stderr, failed.stderr
    not_a_file = tmp_path / "not-an-allocation.json"
    not_a_file.write_text(json.dumps({"layers": {}}))
    failed = spread(str(config), "--allocation-file", str(not_a_file), "--out", str(tmp_path / "bad.json"))
    assert failed.returncode == 2 and "needs layers and lambda" in failed.stderr, failed.stderr
    assert not (tmp_path / "bad.json").exists()
    wrong_function = spread(str(config), "--function", "O", "--lambdas", "0", "--out", str(out))
    assert wrong_function.returncode == 2 and "give another --out" in wrong_function.stderr
