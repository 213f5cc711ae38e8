"""The OBS weight update with a tree picking the masks: SparseGPT is the tree sqr(mul(W, D))."""

import pytest
import torch
from safetensors.torch import load_file

from prunerzero.cli import main
from prunerzero.errors import UserError
from prunerzero.primitives.known import KNOWN_METRICS
from prunerzero.primitives.tree import Tree
from prunerzero.pruning.layer_masks import UnrankableLayer
from prunerzero.pruning.masks import Pattern, prune_mask
from prunerzero.pruning.obs import SPARSEGPT_TREE, obs_prune
from prunerzero.pruning.prune import prune_model
from tests.conftest import tiny_llama


def reference_sparsegpt(weight, hessian, sparsity, pattern, blocksize=128, percdamp=0.01):
    """SparseGPT's published procedure, transcribed independently: masks from w^2 / d^2."""
    W, H = weight.clone().float(), hessian.clone()
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Q1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros(W.shape[0], i2 - i1), torch.zeros(W.shape[0], i2 - i1), Hinv[i1:i2, i1:i2]
        d1 = torch.diag(Hinv1)
        mask1 = (torch.zeros_like(W1, dtype=torch.bool) if pattern.structured
                 else prune_mask(W1 ** 2 / d1.reshape(1, -1) ** 2, sparsity, pattern, group="tensor"))
        for i in range(i2 - i1):
            if pattern.structured and i % pattern.m == 0:
                mask1[:, i:i + pattern.m] = prune_mask(W1[:, i:i + pattern.m] ** 2 / d1[i:i + pattern.m].reshape(1, -1) ** 2,
                                                       sparsity, pattern)
            w, d = W1[:, i], Hinv1[i, i]
            q = torch.where(mask1[:, i], torch.zeros_like(w), w)
            Q1[:, i], err = q, (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W


def layer(seed=0, out=48, cols=300, tokens=600):
    """A layer and the statistics of correlated inputs with outlier features (as an LLM's are)."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.eye(cols) + torch.randn(cols, cols, generator=gen) / cols ** 0.5
    x = (torch.randn(tokens, cols, generator=gen) @ mix) * torch.exp(torch.randn(cols, generator=gen))
    return torch.randn(out, cols, generator=gen), 2 * x.T @ x / tokens, (x ** 2).sum(0) / tokens


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_the_sparsegpt_tree_is_sparsegpts_procedure(pattern):
    pat = Pattern.parse(pattern)
    for seed in range(3):
        w, h, _ = layer(seed)
        h[:, 7] = h[7, :] = 0  # a dead input
        ours, ref = obs_prune(w, h, 0.5, pat, SPARSEGPT_TREE), reference_sparsegpt(w, h, 0.5, pat)
        assert torch.equal(ours == 0, ref == 0)  # the same masks
        assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-4)  # the same updated weights
        assert (ours == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)


def test_a_tree_inside_the_update_reconstructs_better_than_its_masks_alone():
    w, h, x = layer(1)
    wanda = KNOWN_METRICS["wanda"].tree
    updated = obs_prune(w, h, 0.5, Pattern(), wanda, x=x, scope="row")
    masked = w.clone()
    masked[prune_mask(wanda.evaluate({"W": w.abs(), "X": x.reshape(1, -1)}), 0.5, Pattern())] = 0

    def error(p):
        return torch.trace((w - p) @ h @ (w - p).T).item()

    assert (updated == 0).sum(1).tolist() == [150] * 48  # per row: half of each row's weights
    assert error(updated) < 0.8 * error(masked), (error(updated), error(masked))


def test_a_rule_that_cannot_rank_a_block_and_a_singular_hessian_are_named():
    w, h, _ = layer(2)
    with pytest.raises(UnrankableLayer, match="input columns 0-127: scores are one value"):
        obs_prune(w, h, 0.5, Pattern(), Tree.parse("sub(W, W)"), name="layer.q")
    with pytest.raises(UserError, match=r"not positive definite .* add calibration windows \(e.g. --nsamples 8\)"):
        obs_prune(w, -torch.eye(300), 0.5, Pattern(), SPARSEGPT_TREE, nsamples=4, percdamp=0.0)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_method_sparsegpt_and_its_tree_with_the_update_give_identical_models(pattern, windows):
    a, b = tiny_llama(), tiny_llama()
    prune_model(a, "sparsegpt", 0.5, Pattern.parse(pattern), windows=windows)
    prune_model(b, "tree", 0.5, Pattern.parse(pattern), windows=windows, tree=Tree.parse("sqr(mul(W, D))"), update="obs")
    for (n, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), n


def test_the_command_line_gives_bit_identical_weights_and_refuses_d_without_the_update(model_and_data, tmp_path, capsys):
    model, data = model_and_data
    base = ["prune", "--model", model, "--data-dir", data, "--nsamples", "4", "--seqlen", "64", "--no-eval"]
    for pattern in ("unstructured", "2:4"):
        assert main(base + ["--pattern", pattern, "--method", "sparsegpt", "--save-model", str(tmp_path / f"s-{pattern}")]) == 0
        assert main(base + ["--pattern", pattern, "--method", "tree", "--tree", "sqr(mul(W, D))", "--update", "obs",
                            "--save-model", str(tmp_path / f"t-{pattern}")]) == 0
        s = load_file(tmp_path / f"s-{pattern}" / "model.safetensors")
        t = load_file(tmp_path / f"t-{pattern}" / "model.safetensors")
        assert s.keys() == t.keys() and all(torch.equal(s[k], t[k]) for k in s)
    capsys.readouterr()
    for argv, words in ((["--method", "tree", "--tree", "sqr(mul(W, D))"], "add --update obs"),
                        (["--method", "wanda", "--update", "obs"], "--method tree --tree wanda --update obs"),
                        (["--method", "magnitude", "--update", "obs"], "--tree abs(W)")):
        assert main(base + argv) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("prunerzero: error:") and words in err, err


def test_a_tree_file_that_records_its_update_is_pruned_with_it(model_and_data, tmp_path, capsys):
    import json

    model, data = model_and_data
    tree = Tree.parse("sqr(mul(W, D))")
    (tmp_path / "rule.json").write_text(json.dumps({"update": "obs", "trees": [{"rank": 1, "tree": tree.to_json()}]}))
    base = ["prune", "--model", model, "--data-dir", data, "--nsamples", "4", "--seqlen", "64", "--no-eval"]
    assert main(base + ["--method", "tree", "--tree", str(tmp_path / "rule.json"), "--save-model", str(tmp_path / "f")]) == 0
    assert main(base + ["--method", "sparsegpt", "--save-model", str(tmp_path / "s")]) == 0
    f, s = load_file(tmp_path / "f" / "model.safetensors"), load_file(tmp_path / "s" / "model.safetensors")
    assert all(torch.equal(f[k], s[k]) for k in s)
    (tmp_path / "rule.json").write_text(json.dumps({"update": "sgd", "trees": [{"rank": 1, "tree": tree.to_json()}]}))
    capsys.readouterr()
    assert main(base + ["--method", "tree", "--tree", str(tmp_path / "rule.json")]) == 2
    assert "records update 'sgd'" in capsys.readouterr().err


def test_an_obs_search_exports_a_file_that_prunes_with_its_update(model_and_data, tmp_path, capsys):
    """search (update obs) -> export -> prune --tree export.json: the update travels in the file."""
    import json

    import yaml

    model, data = model_and_data
    cfg = tmp_path / "obs.yaml"
    cfg.write_text(yaml.safe_dump({
        "name": "o", "output_dir": str(tmp_path / "runs"), "seed": 1, "model": {"name": model, "device": "cpu"},
        "calibration": {"nsamples": 4, "seqlen": 64, "data_dir": data},
        "fitness": {"seqlen": 64, "windows": 2, "update": "obs"},
        "search": {"population": 6, "generations": 1, "terminals": ["W", "X", "D"], "seed_known_metrics": True},
        "evaluator": {"type": "inprocess"}}))
    assert main(["search", "--config", str(cfg), "--no-heldout"]) == 0
    assert list((tmp_path / "runs" / "o").glob("obs-factors-*.safetensors"))  # the factors cached in the run
    assert main(["export", str(tmp_path / "runs" / "o"), "--out", str(tmp_path / "e.json")]) == 0
    exported = json.loads((tmp_path / "e.json").read_text())
    assert exported["update"] == "obs"
    best = exported["trees"][0]["formula"]
    base = ["prune", "--model", model, "--data-dir", data, "--nsamples", "4", "--seqlen", "64", "--no-eval",
            "--method", "tree"]
    assert main(base + ["--tree", str(tmp_path / "e.json"), "--save-model", str(tmp_path / "f")]) == 0
    assert main(base + ["--tree", best, "--update", "obs", "--save-model", str(tmp_path / "u")]) == 0
    assert main(base + ["--tree", best, "--save-model", str(tmp_path / "n")]) == (2 if "D" in best else 0)
    f, u = load_file(tmp_path / "f" / "model.safetensors"), load_file(tmp_path / "u" / "model.safetensors")
    assert all(torch.equal(f[k], u[k]) for k in u)
    if "D" not in best:  # without the update the same rule gives other weights
        n = load_file(tmp_path / "n" / "model.safetensors")
        assert not all(torch.equal(f[k], n[k]) for k in n)
    # shipping it: the file records the update, and a rule inside the update must beat SparseGPT's own
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    sparsegpt = str(SPARSEGPT_TREE)
    rescore = tmp_path / "rescore.json"

    def ship(name, ppl, *extra):
        rescore.write_text(json.dumps({
            "run": "o", "text": "wikitext2:validation", "windows": 2, "seqlen": 64, "stats_mode": "sequential",
            "calibration": {"nsamples": 4, "seqlen": 64}, "baselines": {sparsegpt: {"name": "sparsegpt", "perplexity": 50.0}},
            "trees": {best: {"rank": 1, "fitness": exported["trees"][0]["fitness"], "perplexity": ppl}}}))
        return subprocess.run([sys.executable, str(root / "benchmarks" / "ship_metric.py"), str(tmp_path / "runs" / "o"),
                               "--config", str(cfg), "--description", "d", "--out-dir", str(tmp_path / "trees"),
                               "--name", name, "--rescore", str(rescore), "--rank", "1", *extra],
                              capture_output=True, text=True, cwd=root)

    refused = ship("loses", 51.0)
    assert refused.returncode == 2 and "does not beat SparseGPT" in refused.stderr, refused.stderr
    done = ship("wins", 49.0)
    assert done.returncode == 0, done.stderr
    shipped = json.loads((tmp_path / "trees" / "wins.json").read_text())
    assert shipped["update"] == "obs" and shipped["found_by"]["update"] == "obs"
