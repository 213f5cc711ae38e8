"""calibration.gradient_nsamples / gradient_seqlen: G from windows of its own, X from the run's."""

from types import SimpleNamespace

import pytest
import torch

from prunerzero import data
from prunerzero.config import config_from_dict
from prunerzero.errors import UserError
from prunerzero.fitness.model_fitness import FitnessSettings, ModelFitness, statistics_paths
from prunerzero.pruning.calibration import Calibration
from prunerzero.pruning.stats import collect_activation_norms, compute_gradients
from prunerzero.runfolder import fitness_settings
from prunerzero.runs import fingerprint, heldout_calibration
from tests.conftest import tiny_llama
from tests.test_fitness import CharTokenizer

X_CALIB, G_CALIB = Calibration(nsamples=2, seqlen=32), Calibration(nsamples=3, seqlen=48)


def test_g_comes_from_its_own_windows_and_x_from_the_runs(tmp_path):
    model, tokenizer, src = tiny_llama(), CharTokenizer(), SimpleNamespace(fingerprint="tiny-test")
    settings = FitnessSettings(model="tiny", calibration=X_CALIB, gradient_calibration=G_CALIB, seqlen=32, windows=2)
    fitness = ModelFitness(settings, tmp_path, model, tokenizer, src)
    want_g = compute_gradients(model, G_CALIB.windows(tokenizer))
    want_x = collect_activation_norms(model, X_CALIB.windows(tokenizer))
    assert set(fitness.gradients) == set(want_g)
    for name in want_g:
        assert torch.allclose(fitness.gradients[name], want_g[name], rtol=1e-5, atol=1e-6), name
        assert torch.allclose(fitness.activations[name], want_x[name], rtol=1e-5, atol=1e-6), name
    # the G file is the one any run calibrated on G's windows reads: the cache is shared with them
    same_g = FitnessSettings(model="tiny", calibration=G_CALIB, seqlen=32, windows=2)
    assert statistics_paths(settings, tmp_path, "f")[1] == statistics_paths(same_g, tmp_path, "f")[1]
    assert statistics_paths(settings, tmp_path, "f")[0] != statistics_paths(same_g, tmp_path, "f")[0]


def test_fitness_windows_avoid_both_window_sets(monkeypatch):
    n = 8000
    monkeypatch.setattr(data, "joined_tokens", lambda *a, **k: torch.arange(n))  # a token id is its position
    x_calib, g_calib = ("wikitext2", None, 8, 256, 3), ("wikitext2", None, 6, 512, 3)
    fit = data.fitness_tokens(None, "wikitext2", "validation", 128, 10, [x_calib, g_calib])
    used = set()
    for c in (x_calib, g_calib):
        used |= set(data.calibration_windows(None, "wikitext2", c[2], c[3], c[4]).flatten().tolist())
    assert fit.numel() == 1280 and not used & set(fit.tolist())
    # a single calibration (how every earlier run was written) draws the windows it always drew
    assert torch.equal(data.fitness_tokens(None, "wikitext2", "validation", 128, 10, x_calib),
                       data.fitness_tokens(None, "wikitext2", "validation", 128, 10, [x_calib]))
    # a re-score's unused windows avoid the fitness windows chosen around both sets
    unused = data.unused_tokens(None, "wikitext2", "validation", 256, 4, (128, 10), [x_calib, g_calib], None, 2)
    assert not (used | set(fit.tolist())) & set(unused.tolist())


def test_config_builds_the_gradient_calibration_and_keeps_old_fingerprints():
    plain = config_from_dict({"calibration": {"nsamples": 4, "seqlen": 64}})
    assert fitness_settings(plain).gradient_calibration is None
    assert "gradient_calibration" not in fingerprint(plain)["fitness"]  # runs written before resume unchanged
    assert heldout_calibration(plain).nsamples == 4
    split = config_from_dict({"calibration": {"nsamples": 4, "seqlen": 64, "gradient_nsamples": 32,
                                              "gradient_seqlen": 2048}})
    g = fitness_settings(split).gradient_calibration
    assert (g.nsamples, g.seqlen, g.seed, g.source) == (32, 2048, 0, "wikitext2")
    assert fingerprint(split)["fitness"]["gradient_calibration"]["nsamples"] == 32
    assert fingerprint(split) != fingerprint(plain)  # a resume cannot change it
    held = heldout_calibration(split)  # held-out cells calibrate as the search's G did
    assert (held.nsamples, held.seqlen) == (32, 2048)
    only_n = fitness_settings(config_from_dict({"calibration": {"seqlen": 64, "gradient_nsamples": 16}}))
    assert (only_n.gradient_calibration.nsamples, only_n.gradient_calibration.seqlen) == (16, 64)


@pytest.mark.parametrize("value, word", [(0, "must be positive"), (-3, "must be positive"), ("many", "must be int"),
                                         (10**9, "above the limit")])
def test_bad_gradient_window_counts_are_refused(value, word):
    with pytest.raises(UserError, match=f"calibration.gradient_nsamples.*{word}|{word}"):
        config_from_dict({"calibration": {"gradient_nsamples": value}})


def test_a_search_and_its_rescore_read_g_from_the_gradient_windows(tmp_path, monkeypatch):
    import json

    import yaml

    import prunerzero.pruning.stats as stats
    from prunerzero.cli import main
    from prunerzero.evaluation import rescore
    from tests.conftest import local_data, tiny_model_folder

    model, text = str(tiny_model_folder(tmp_path / "model")), str(local_data(tmp_path / "data", lines=120))
    cfg = {"name": "g", "output_dir": str(tmp_path / "runs"), "seed": 1, "model": {"name": model, "device": "cpu"},
           "calibration": {"nsamples": 2, "seqlen": 32, "gradient_nsamples": 3, "gradient_seqlen": 48, "data_dir": text},
           "fitness": {"seqlen": 32, "windows": 2},
           "search": {"population": 4, "generations": 1, "terminals": ["W", "G", "X"], "init_max_depth": 2,
                      "seed_trees": ["mul(W, G)"]}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["search", "--config", str(tmp_path / "c.yaml"), "--no-heldout"]) == 0
    run = tmp_path / "runs" / "g"
    settings = fitness_settings(config_from_dict({**cfg, "output_dir": str(tmp_path / "runs")}))
    grads = statistics_paths(settings, run)[1]
    assert [p.name for p in run.glob("gradients-*")] == [grads.name]
    assert grads.name == statistics_paths(FitnessSettings(model=model, calibration=settings.gradient_calibration), run)[1].name

    # a re-score with the run's own statistics reads the search's G: nothing is computed again
    monkeypatch.setattr(stats, "compute_gradients", lambda *a, **k: pytest.fail("G computed again"))
    assert main(["rescore", str(run), "--top", "1", "--windows", "1", "--seqlen", "32", "--baselines", "mul(W, G)"]) == 0
    (record,) = [json.loads(p.read_text()) for p in (run / rescore.RESCORE_DIR).glob("*.json")]
    assert {c["nsamples"] for c in record["avoids"]["calibrations"]} == {2, 3}
    # another calibration gives X and G both, as `prunerzero prune` takes them
    monkeypatch.undo()
    assert main(["rescore", str(run), "--top", "1", "--windows", "1", "--seqlen", "32", "--nsamples", "1",
                 "--baselines", "mul(W, G)"]) == 0
    assert len(list(run.glob("gradients-*"))) == 2
