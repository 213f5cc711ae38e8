"""Validation re-score: unused windows, resumable records, clear errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from prunerzero import data
from prunerzero.cli import main
from prunerzero.config import config_from_dict
from prunerzero.errors import UserError
from prunerzero.evaluation import rescore
from prunerzero.fitness.model_fitness import ModelFitness
from prunerzero.primitives.known import KNOWN_METRICS
from prunerzero.search import checkpoint as ckpt
from tests.conftest import local_data, tiny_model_folder


def test_unused_windows_share_no_token_with_the_fitness_or_any_calibration(monkeypatch):
    n = 20000
    monkeypatch.setattr(data, "joined_tokens", lambda *a, **k: torch.arange(n))  # a token id is its position
    run_calib, other_calib = ("wikitext2", None, 8, 256, 3), ("wikitext2", "validation", 6, 512, 0)
    fitness = data.fitness_tokens(None, "wikitext2", "validation", 128, 10, run_calib)
    unused = data.unused_tokens(None, "wikitext2", "validation", 1024, 5, (128, 10), [run_calib, other_calib])
    assert unused.numel() == 5 * 1024
    used = set(fitness.tolist())
    for calib in (run_calib, other_calib):
        used |= set(data.calibration_windows(None, "wikitext2", calib[2], calib[3], calib[4]).flatten().tolist())
    assert not used & set(unused.tolist())
    for w in unused.reshape(5, 1024):  # each window is contiguous text
        assert torch.equal(w, torch.arange(int(w[0]), int(w[0]) + 1024))
    with pytest.raises(UserError, match="room for only"):
        data.unused_tokens(None, "wikitext2", "validation", 1024, 50, (128, 10), [run_calib])
    # a fitness text apart from the calibration text: the windows follow the fitness tokens
    after = data.unused_tokens(None, "wikitext2", "validation", 100, 3, (128, 10), [("c4", None, 8, 256, 3)])
    assert torch.equal(after, torch.arange(1280, 1580))
    with pytest.raises(UserError, match="needs a run calibrated on it"):
        data.unused_tokens(None, "wikitext2", "validation", 100, 3, (128, 10), [("c4", None, 8, 256, 3), run_calib])


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("rescore")
    model, text = str(tiny_model_folder(root / "model")), str(local_data(root / "data", lines=120))
    cfg = {"name": "r", "output_dir": str(root / "runs"), "seed": 1, "model": {"name": model, "device": "cpu"},
           "calibration": {"nsamples": 2, "seqlen": 32, "data_dir": text},
           "fitness": {"seqlen": 32, "windows": 2},
           "search": {"population": 4, "generations": 1, "terminals": ["W", "X"], "init_max_depth": 2}}
    (root / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["search", "--config", str(root / "c.yaml"), "--no-heldout"]) == 0
    return root / "runs" / "r"


def test_rescore_measures_the_top_trees_and_baselines_once_and_resumes(small_run, monkeypatch, capsys):
    args = ["rescore", str(small_run), "--top", "2", "--windows", "2", "--seqlen", "48", "--baselines", "wanda,magnitude"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "vs wanda" in out and "vs magnitude" in out
    (path,) = (small_run / rescore.RESCORE_DIR).glob("*.json")
    record = json.loads(path.read_text())
    state, _ = ckpt.load_checkpoint(small_run)
    top = [r["formula"] for r in ckpt.export_trees(state, 2)["trees"]]
    assert sorted(record["trees"]) == sorted(top)
    assert {v["name"] for v in record["baselines"].values()} == {"wanda", "magnitude"}
    assert record["baselines"][KNOWN_METRICS["wanda"].formula]["perplexity"] > 1
    assert record["stats_mode"] == "sequential" and record["seqlen"] == 48
    # every measured entry keeps its windows' losses: the perplexity is their mean, exponentiated,
    # and the table compares each with the first baseline window by window
    for entry in [*record["trees"].values(), *record["baselines"].values()]:
        assert len(entry["window_losses"]) == 2
        assert entry["perplexity"] == pytest.approx(math.exp(sum(entry["window_losses"]) / 2), rel=1e-9)
    assert "paired vs wanda" in out and "±" in out
    # a second call measures nothing again; one more baseline extends the same record
    measured = []
    monkeypatch.setattr(ModelFitness, "evaluate", lambda self, tree, budget=None: measured.append(str(tree)) or
                        pytest.fail("measured twice"))
    assert main(args) == 0 and measured == []
    # Wanda spelt another way (W is positive in the keys) is the same function: not measured again
    assert main(args[:-1] + ["wanda,magnitude,mul(W, sqrt(X))"]) == 0 and measured == []
    monkeypatch.undo()
    # a formula's own commas do not split it
    assert main(args[:-1] + ["wanda,magnitude,mul(W, X)"]) == 0
    baselines = json.loads(path.read_text())["baselines"]
    assert len(baselines) == 4 and {v["name"] for v in baselines.values()} >= {"wanda", "magnitude"}
    spelt = baselines["mul(W, sqrt(X))"]
    assert spelt["perplexity"] == baselines[KNOWN_METRICS["wanda"].formula]["perplexity"]
    # the record names the one command that measures all it holds, quoted for a shell
    assert json.loads(path.read_text())["command"].endswith("--baselines 'wanda,magnitude,mul(W, sqrt(X)),mul(W, X)'") and len(list(path.parent.glob("*.json"))) == 1
    # other windows or statistics are another record
    assert main(args + ["--stats", "once"]) == 0 and len(list(path.parent.glob("*.json"))) == 2
    # sequential statistics under another calibration: the dense model's X is never collected for it
    stored = sorted(p.name for p in small_run.glob("activations-*"))
    assert main(args + ["--nsamples", "1"]) == 0 and len(list(path.parent.glob("*.json"))) == 3
    assert sorted(p.name for p in small_run.glob("activations-*")) == stored


@pytest.mark.parametrize("extra, words", [
    (["--top", "0"], "--top must be at least 1"),
    (["--windows", "0"], "--windows must be at least 1"),
    (["--nsamples", "0"], "--nsamples must be at least 1"),
    (["--baselines", "wanda,nosuchmetric"], "nosuchmetric"),
    (["--windows", "5000"], "room for only"),
    (["--baselines", "wanda,mul(W, X"], "unbalanced '('"),
])
def test_rescore_refuses_bad_input_with_one_clear_line(small_run, capsys, extra, words):
    assert main(["rescore", str(small_run), "--seqlen", "48", *extra]) == 2
    assert words in capsys.readouterr().err.strip().splitlines()[-1]


def test_rescore_refuses_a_multi_setting_run_rather_than_measure_a_setting_it_never_scored(tmp_path):
    cfg = config_from_dict({"name": "m", "output_dir": str(tmp_path),
                            "fitness": {"settings": [{"pattern": "2:4"}, {"sparsity": 0.7, "allocation": "owl"}]}})
    with pytest.raises(UserError, match="scored 2 settings together"):
        rescore.rescore_run(tmp_path / "m", cfg, rescore.RescoreSettings())


def test_rescore_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["rescore", str(tmp_path)]) == 2
    assert "is not a run folder" in capsys.readouterr().err


def test_a_resumed_search_reranks_the_recorded_trees():
    """After a resume the hall of fame ranks anew: the record follows it, and a tree no longer
    ranked keeps its measurement, marked (the command to re-measure it would else name stale ranks)."""
    record = {"trees": {"mul(W, X)": {"rank": 1, "fitness": 10.0, "perplexity": 9.0},
                        "W": {"rank": 2, "fitness": 11.0, "perplexity": 12.0}}}
    ranked = [{"rank": 1, "formula": "add(W, X)", "fitness": 8.0}, {"rank": 2, "formula": "mul(W, X)", "fitness": 10.0}]
    assert rescore.rerank(record, ranked)
    assert record["trees"]["mul(W, X)"] == {"rank": 2, "fitness": 10.0, "perplexity": 9.0}
    assert record["trees"]["W"]["unranked"] is True and record["trees"]["W"]["perplexity"] == 12.0
    assert not rescore.rerank(record, ranked)  # nothing new: nothing to write


def test_paired_change_is_the_perplexity_ratio_with_the_spread_of_the_windows():
    ref = [3.0, 3.2, 2.8, 3.1]
    # the same shift on every window: the exact ratio of perplexities and no spread
    change, error = rescore.paired_change([x - 0.02 for x in ref], ref)
    assert change == pytest.approx(math.exp(-0.02) - 1, rel=1e-12) and error == pytest.approx(0, abs=1e-12)
    ppl = lambda losses: math.exp(sum(losses) / len(losses))
    tree = [3.05, 3.1, 2.9, 3.0]
    change, error = rescore.paired_change(tree, ref)
    assert change == pytest.approx(ppl(tree) / ppl(ref) - 1, rel=1e-12)
    d = [a - b for a, b in zip(tree, ref)]
    mean = sum(d) / 4
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 3)
    assert error == pytest.approx(math.exp(mean) * sd / 2, rel=1e-12)
    # windows that do not pair (another count, one window, none recorded) give no comparison
    assert rescore.paired_change(tree[:3], ref) is None
    assert rescore.paired_change(tree[:1], ref[:1]) is None
    record = {"run": "r", "windows": 4, "seqlen": 8, "text": "t", "stats_mode": "sequential",
              "calibration": {"nsamples": 1, "seqlen": 8},
              "baselines": {"sqr(mul(W, D))": {"name": "sparsegpt", "perplexity": ppl(ref), "window_losses": ref}},
              "trees": {"mul(W, X)": {"rank": 1, "fitness": 1.0, "perplexity": ppl(tree), "window_losses": tree},
                        "W": {"rank": 2, "fitness": 2.0, "perplexity": 30.0}}}
    lines = rescore.format_rescore(record).splitlines()
    (row,) = [line for line in lines if line.endswith("mul(W, X)")]
    assert f"{100 * change:+.2f}±{100 * error:.2f}%" in row
    (old,) = [line for line in lines if line.endswith("  W")]
    assert "±" not in old  # a record from before the losses were kept: no paired cell
