import json
import math

import pytest
import torch

from prunerzero.cli import main
from prunerzero.config import config_from_dict
from prunerzero.errors import UserError
from prunerzero.evaluation.plots import fitness_figure, sweep_figure
from prunerzero.evaluation.sweep import sparsity_sweep, tree_label
from prunerzero.primitives.tree import Tree
from prunerzero.pruning.stats import compute_gradients
from prunerzero.runs import run_search
from prunerzero.search import checkpoint as ckpt

from .conftest import tiny_llama


@pytest.fixture(scope="module")
def recon_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    cfg = config_from_dict({"name": "demo", "output_dir": str(tmp), "seed": 1,
                            "search": {"population": 10, "generations": 2}, "evaluator": {"type": "reconstruction"}})
    state = run_search(cfg)
    return cfg.run_dir, state


def test_report_of_a_run(recon_run):
    run_dir, state = recon_run
    assert main(["report", str(run_dir)]) == 0
    page = (run_dir / "report.html").read_text()
    best = ckpt.export_trees(state, 1)["trees"][0]["formula"]
    assert f"<code>{best}</code>" in page.replace("&#x27;", "'")
    for label in ("candidates generated", "simplified", "regenerated", "formula-cache hits", "mask-cache hits",
                  "evaluated", "degenerate"):
        assert label in page
    assert f"<td class='num'>{state.counters['evaluated']}</td>" in page
    assert page.count("data:image/png;base64,") == 2  # the fitness plot and the Pareto front; no sweep
    assert "Pareto front" in page and "--pareto" in page
    assert "search.population" in page and "reconstruction" in page  # the configuration
    assert (run_dir / "fitness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_out_and_top(recon_run, tmp_path):
    run_dir, state = recon_run
    out = tmp_path / "elsewhere" / "r.html"
    assert main(["report", str(run_dir), "--out", str(out), "--top", "12"]) == 0
    page = out.read_text()
    assert page.count("<tr><td class='num'>") + page.count('<tr class="best">') >= min(12, len(ckpt.export_trees(state, 12)["trees"]))


def test_sweep_refused_on_reconstruction_run(recon_run, capsys):
    run_dir, _ = recon_run
    assert main(["report", str(run_dir), "--sweep"]) == 2
    err = capsys.readouterr().err
    assert "model-based run" in err and len(err.strip().splitlines()) == 1
    assert not (run_dir / "sweep.json").exists()


def test_missing_run_folder(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert main(["report", str(tmp_path)]) == 2  # a folder, but no state.json
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "does not exist" in err[0] and "state.json" in err[1]


def test_bad_sweep_flags_fail_before_loading(recon_run, tmp_path):
    run_dir, _ = recon_run
    with pytest.raises(UserError, match="pattern"):
        sparsity_sweep(None, torch.zeros(10), [], sparsities=[0.5], patterns=["unstructured"])
    with pytest.raises(UserError, match="outside"):
        sparsity_sweep(None, torch.zeros(10), [], sparsities=[1.5], patterns=[])


@pytest.fixture
def one_thread():
    """Tiny matrices: one thread is fastest, and immune to OpenMP contention on a busy machine."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def test_sparsity_sweep_on_a_tiny_model(tmp_path, one_thread):
    torch.manual_seed(0)
    model = tiny_llama()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    windows = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    tokens = torch.randint(0, 128, (300,), generator=torch.Generator().manual_seed(2))
    grads = compute_gradients(model, windows)
    trees = [("#1 pruner-zero", Tree.parse("mul(abs(mul(W, W)), mms(G))")), Tree.parse("mul(abs(W), sqrt(X))")]

    seen = []

    def check_restored(row):  # called after every cell: the weights are dense again, bit for bit
        state = model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in dense.items())
        seen.append(row)

    sweep = sparsity_sweep(model, tokens, trees, windows=windows, gradients=grads, sparsities=[0.3, 0.6],
                           patterns=["2:4"], eval_seqlen=64, eval_windows=2, on_cell=check_restored)
    labels = ["magnitude", "wanda", "sparsegpt", "#1 pruner-zero", "mul(abs(W), sqrt(X))"]
    assert [m["label"] for m in sweep["methods"]] == labels
    assert len(sweep["cells"]) == len(seen) == 5 * 3
    cells = {(c["method"], c["pattern"], c["sparsity"]) for c in sweep["cells"]}
    for label in labels:
        assert {(label, "unstructured", 0.3), (label, "unstructured", 0.6), (label, "2:4", 0.5)} <= cells
    for c in sweep["cells"]:
        assert math.isfinite(c["ppl"]) and c["ppl"] > 1
        assert abs(c["sparsity_actual"] - c["sparsity"]) < 0.02
    assert math.isfinite(sweep["dense_ppl"]) and sweep["dense_ppl"] > 1
    assert sweep["eval"] == {"seqlen": 64, "windows": 2, "tokens": 128}
    json.dumps(sweep)  # plain data

    png = sweep_figure(sweep, tmp_path / "sweep.png", "tiny")
    assert png[:4] == b"\x89PNG" and (tmp_path / "sweep.png").read_bytes() == png


def test_sweep_needs_statistics(one_thread):
    model = tiny_llama()
    tokens = torch.randint(0, 128, (200,))
    with pytest.raises(UserError, match="calibration windows"):
        sparsity_sweep(model, tokens, [], baselines=["wanda"], sparsities=[0.5], patterns=[], eval_seqlen=64)
    with pytest.raises(UserError, match="uses G"):
        sparsity_sweep(model, tokens, [Tree.parse("mul(W, G)")], baselines=[], sparsities=[0.5], patterns=[], eval_seqlen=64)
    with pytest.raises(UserError, match="fewer than one window"):
        sparsity_sweep(model, tokens, [], baselines=["magnitude"], sparsities=[0.5], patterns=[], eval_seqlen=512)


def test_saved_sweep_shown_again(recon_run, tmp_path):
    """A sweep.json in the run folder is shown by a report made without --sweep."""
    import shutil

    run_dir, _ = recon_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    sweep = {"dense_ppl": 20.0, "model": "m", "device": "cpu", "made": "then", "eval": {"seqlen": 8, "windows": 1, "tokens": 8},
             "methods": [{"label": "magnitude", "kind": "magnitude", "formula": None},
                         {"label": "#1 mul(W, X)", "kind": "tree", "formula": "mul(W, X)"}],
             "cells": [{"method": m, "kind": k, "pattern": p, "sparsity": s, "sparsity_actual": s, "ppl": v, "seconds": 0.1}
                       for m, k in (("magnitude", "magnitude"), ("#1 mul(W, X)", "tree"))
                       for p, s, v in (("unstructured", 0.5, 30.0), ("unstructured", 0.7, 90.0), ("2:4", 0.5, 60.0))]}
    (copy / "sweep.json").write_text(json.dumps(sweep))
    assert main(["report", str(copy)]) == 0
    page = (copy / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "#1 mul(W, X)" in page and "Read from sweep.json" in page
    assert (copy / "sweep.png").is_file()


def test_fitness_figure_empty_log(tmp_path):
    from prunerzero.search.state import SearchState

    assert fitness_figure(SearchState(), "y", "t", tmp_path / "f.png") is None


def test_sweep_labels_name_known_metrics():

    assert tree_label(1, "mul(W, sqrt(X))") == "#1 mul(W, sqrt(X)) (= wanda)"
    assert tree_label(2, "mul(W, X)") == "#2 mul(W, X)"
