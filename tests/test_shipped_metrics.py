"""The metrics prunerzero ships (prunerzero/trees/) and the script that ships them."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from prunerzero.cli import main
from prunerzero.primitives.known import KNOWN_METRICS, resolve_tree, shipped_trees
from prunerzero.primitives.tree import Tree
from prunerzero.search import checkpoint as ckpt

ROOT = Path(__file__).resolve().parent.parent
RECON = {"seed": 3, "search": {"population": 8, "generations": 2}, "evaluator": {"type": "reconstruction"}}


@pytest.mark.parametrize("name", sorted(shipped_trees()))
def test_each_shipped_metric_says_how_it_was_found_and_beat_wanda_on_its_fitness_text(name):
    path = shipped_trees()[name]
    data = json.loads(path.read_text())
    assert data["name"] == name and name not in KNOWN_METRICS and data["description"]
    found = data["found_by"]
    assert (ROOT / found["config"]).is_file() and (ROOT / found["record"]).is_file()
    config = yaml.safe_load((ROOT / found["config"]).read_text())
    assert config["fitness"]["pattern"] == found["pattern"] and config["fitness"]["sparsity"] == found["sparsity"]
    assert config["fitness"]["split"] != "test"  # chosen on validation text only
    best = data["trees"][0]
    tree = Tree.load(path)
    assert str(tree) == best["formula"] and str(resolve_tree(name)) == best["formula"]
    # the reason it ships: on the text the search scored with, it prunes better than Wanda; a rule
    # found inside the weight update is measured against SparseGPT's own rule there instead (as
    # ship_metric.py chooses), on the fitness text and on the validation re-score
    if data.get("update") != "obs":
        wanda = data["reference_fitness"]["wanda"]
        assert not wanda["estimated"] and best["fitness"] < wanda["fitness"]
    else:
        assert data["found_by"]["update"] == "obs" and config["fitness"]["update"] == "obs"
        sparsegpt = data["reference_fitness"]["sparsegpt"]
        # a SparseGPT stopped on the multi-fidelity's low rung was not measured on the full text: the
        # validation re-score below, which measures both in full, is then the comparison
        assert sparsegpt["estimated"] or best["fitness"] < sparsegpt["fitness"]
        assert data["validation_rescore"]["perplexity"] < data["validation_rescore"]["baselines"]["sparsegpt"]
    # and the search's record agrees with the file
    record = json.loads((ROOT / found["record"]).read_text())
    assert any(r.get("tree", r.get("formula")) == best["formula"] and r["fitness"] == best["fitness"]
               for r in record["top10"])


def small_search(tmp_path):
    """A finished reconstruction search (seed 3): its config file, run folder and state."""
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump({"name": "r", "output_dir": str(tmp_path / "runs"), **RECON}))
    assert main(["search", "--config", str(cfg_path), "--no-heldout"]) == 0
    run = tmp_path / "runs" / "r"
    state, _ = ckpt.load_checkpoint(run)
    return cfg_path, run, state


def test_ship_metric_writes_a_loadable_file_and_refuses_known_names_and_overwrites(tmp_path):
    cfg_path, run, state = small_search(tmp_path)
    best = state.hall_of_fame(1)[0]
    script = [sys.executable, str(ROOT / "benchmarks" / "ship_metric.py"), str(run), "--config", str(cfg_path),
              "--description", "test metric", "--out-dir", str(tmp_path / "trees")]

    def ship(*extra):
        return subprocess.run(script + list(extra), capture_output=True, text=True, cwd=ROOT)

    done = ship("--name", "my-metric")
    assert done.returncode == 0, done.stderr
    shipped = tmp_path / "trees" / "my-metric.json"
    data = json.loads(shipped.read_text())
    assert str(Tree.load(shipped)) == best["tree"] and data["trees"][0]["fitness"] == best["fitness"]
    assert data["found_by"]["seed"] == 3 and data["found_by"]["generation"] == best["generation"]
    # the known metrics were seeded into generation 0: their fitness on the same text is in the file
    wanda = KNOWN_METRICS["wanda"].formula
    assert data["reference_fitness"]["wanda"]["fitness"] == state.fitness_of(wanda)
    assert set(data["reference_fitness"]) <= set(KNOWN_METRICS) | set(shipped_trees())
    before = shipped.read_text()
    for extra, word in ((("--name", "my-metric"), "--force"), (("--name", "wanda"), "known metric"),
                        (("--name", "../x"), "plain folder name")):
        refused = ship(*extra)
        assert refused.returncode == 2 and word in refused.stderr.strip().splitlines()[-1], refused.stderr
    assert shipped.read_text() == before and sorted(p.name for p in (tmp_path / "trees").iterdir()) == ["my-metric.json"]


def test_ship_metric_with_a_rescore_ships_the_best_rescored_and_refuses_one_that_loses_to_wanda(tmp_path):
    cfg_path, run, state = small_search(tmp_path)
    first, second = ckpt.export_trees(state, 2)["trees"]
    wanda = KNOWN_METRICS["wanda"].formula

    def record(ppl_first, ppl_second, run_name="r"):
        path = tmp_path / f"rescore-{ppl_first}-{ppl_second}-{run_name}.json"
        path.write_text(json.dumps({
            "run": run_name, "text": "wikitext2:validation", "windows": 8, "seqlen": 2048, "stats_mode": "sequential",
            "calibration": {"nsamples": 8, "seqlen": 1024}, "baselines": {wanda: {"name": "wanda", "perplexity": 100.0}},
            "trees": {first["formula"]: {"rank": 1, "fitness": first["fitness"], "perplexity": ppl_first},
                      second["formula"]: {"rank": 2, "fitness": second["fitness"], "perplexity": ppl_second}}}))
        return path

    def ship(name, *extra):
        return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ship_metric.py"), str(run), "--config",
                               str(cfg_path), "--description", "d", "--out-dir", str(tmp_path / "trees"), "--name", name,
                               *extra], capture_output=True, text=True, cwd=ROOT)

    done = ship("second-wins", "--rescore", str(record(99.0, 95.0)))
    assert done.returncode == 0, done.stderr
    data = json.loads((tmp_path / "trees" / "second-wins.json").read_text())
    assert data["trees"][0]["formula"] == second["formula"]  # the best re-scored, not the best fitness
    assert data["validation_rescore"]["perplexity"] == 95.0 and data["validation_rescore"]["baselines"] == {"wanda": 100.0}
    for extra, word in ((("--rescore", str(record(101.0, 102.0))), "does not beat Wanda"),
                        (("--rescore", str(record(99.0, 95.0, "other"))), "not of 'r'")):
        refused = ship("loses", *extra)
        assert refused.returncode == 2 and word in refused.stderr.strip().splitlines()[-1], refused.stderr
    assert not (tmp_path / "trees" / "loses.json").exists()
    kept = ship("loses", "--rescore", str(record(101.0, 102.0)), "--even-if-it-loses")
    assert kept.returncode == 0 and json.loads((tmp_path / "trees" / "loses.json").read_text())["trees"][0]["rank"] == 1
    # a re-score that kept each window's loss: the file carries the paired gap and its standard error
    path = record(99.0, 95.0)
    rec = json.loads(path.read_text())
    rec["baselines"][wanda]["window_losses"] = [4.6, 4.7]
    rec["trees"][second["formula"]]["window_losses"] = [4.55, 4.67]
    path.write_text(json.dumps(rec))
    done = ship("paired", "--rescore", str(path))
    assert done.returncode == 0 and "paired over the windows, vs wanda" in done.stdout, done.stderr
    gap = json.loads((tmp_path / "trees" / "paired.json").read_text())["validation_rescore"]["paired_vs_wanda"]
    assert gap["change"] == pytest.approx(math.exp(-0.04) - 1) and gap["standard_error"] > 0
