"""The in-process model fitness on a tiny random LLaMA: caches, exact restore, degenerate trees."""

from types import SimpleNamespace

import pytest
import torch

from prunerzero.data import fitness_tokens
from prunerzero.errors import UserError
from prunerzero.fitness.base import WORST_FITNESS
from prunerzero.fitness.model_fitness import (
    FitnessSettings,
    InProcessEvaluator,
    ModelFitness,
    mask_key,
    statistics_paths,
)
from prunerzero.perplexity import perplexity
from prunerzero.primitives.tree import Tree
from prunerzero.pruning.calibration import Calibration
from prunerzero.pruning.masks import Pattern
from prunerzero.pruning.prune import masked_weights, prune_model, score_masks
from tests.conftest import tiny_llama


class CharTokenizer:
    """Bytes as tokens (vocab 128): enough to feed real text to a tiny model."""

    def __call__(self, text, return_tensors=None):
        return SimpleNamespace(input_ids=torch.tensor([[ord(c) % 128 for c in text]]))


@pytest.fixture
def fitness(tmp_path):
    model = tiny_llama()
    settings = FitnessSettings(model="tiny", calibration=Calibration(nsamples=2, seqlen=32), seqlen=32, windows=2)
    return ModelFitness(settings, tmp_path, model, CharTokenizer(), SimpleNamespace(fingerprint="tiny-test"))


def test_evaluation_restores_weights_bitwise_and_matches_real_pruning(fitness):
    before = {k: v.clone() for k, v in fitness.model.state_dict().items()}
    tree = Tree.parse("mul(abs(W), sqrt(X))")
    result = fitness.evaluate(tree)
    assert all(torch.equal(before[k], v) for k, v in fitness.model.state_dict().items())
    assert result.fitness > 1 and result.mask_key and set(result.timings) == {"score_mask", "apply_restore", "forward"}
    # the masked forward gives the same perplexity as really zeroing the weights
    masks = fitness.masks(tree)
    prune_model(fitness.model, "tree", 0.5, Pattern(), tree=tree, activations=fitness.activations)
    ppl, _ = perplexity(fitness.model, fitness.tokens, 32, 2, progress=False)
    assert ppl == pytest.approx(result.fitness, rel=1e-5)
    fitness.model.load_state_dict(before)
    with masked_weights(fitness.model, masks):
        assert all((lin.weight == 0).sum() == 0 for lin in fitness.linears.values())  # swapped only during forward


def test_sequential_mode_prunes_like_the_reference_and_restores_bitwise(tmp_path):
    model = tiny_llama()
    settings = FitnessSettings(model="tiny", calibration=Calibration(nsamples=2, seqlen=32), seqlen=32, windows=2,
                               stats_mode="sequential")
    seq = ModelFitness(settings, tmp_path, model, CharTokenizer(), SimpleNamespace(fingerprint="tiny-test"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tree = Tree.parse("mul(abs(W), sqrt(X))")
    result = seq.evaluate(tree)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the reference procedure: X re-collected block by block on the partly pruned model
    prune_model(model, "tree", 0.5, Pattern(), windows=seq.calib_windows, tree=tree)
    ppl, _ = perplexity(model, seq.tokens, 32, 2, progress=False)
    assert ppl == pytest.approx(result.fitness, rel=1e-5)


def test_mask_cache_catches_monotone_transforms(fitness):
    a = fitness.evaluate(Tree.parse("abs(W)"))
    b = fitness.evaluate(Tree.parse("sqrt(abs(W))"))
    c = fitness.evaluate(Tree.parse("log(W)"))
    assert a.cached is None and b.cached == "mask" and c.cached == "mask"
    assert a.fitness == b.fitness == c.fitness and a.mask_key == b.mask_key == c.mask_key
    d = fitness.evaluate(Tree.parse("G"))
    assert d.cached is None and d.mask_key != a.mask_key


def test_a_low_budget_measures_a_prefix_of_the_fitness_windows(fitness):
    tree = Tree.parse("mul(abs(W), sqrt(X))")
    full, low = fitness.evaluate(tree), fitness.evaluate(tree, budget=1)
    assert full.budget is None and low.budget == 1 and low.cached is None  # cached per budget
    with masked_weights(fitness.model, fitness.masks(tree)):
        first, _ = perplexity(fitness.model, fitness.tokens, 32, 1, progress=False)
    assert low.fitness == pytest.approx(first, rel=1e-6) and low.fitness != full.fitness
    assert fitness.evaluate(tree, budget=1).cached == "mask"
    assert fitness.evaluate(tree, budget=2).cached == "mask"  # 2 windows is the full budget
    with pytest.raises(UserError, match="outside 1..2"):
        fitness.evaluate(tree, budget=3)


def test_degenerate_trees_get_the_worst_fitness_with_a_reason(fitness):
    evaluator = InProcessEvaluator(fitness.settings, "unused", fitness)
    res, = evaluator.evaluate([Tree.parse("mms(sub(W, W))")])
    assert res.fitness == WORST_FITNESS and "constant" in res.reason


def test_mask_key_is_order_independent_and_content_sensitive():
    m = {"a": torch.tensor([[True, False]]), "b": torch.tensor([[False, True]])}
    assert mask_key(m) == mask_key(dict(reversed(list(m.items()))))
    assert mask_key(m) != mask_key({"a": m["b"], "b": m["a"]})


def test_fitness_settings_refuse_the_test_split_and_bad_sparsity():
    from tests.conftest import char_tokenizer

    for split in ("test", "Test"):  # refused where the fitness text is read, whoever builds the settings
        with pytest.raises(UserError, match="held out for the final tables"):
            fitness_tokens(char_tokenizer(), "wikitext2", split, 32, 1, None)
    with pytest.raises(UserError, match="prunes exactly"):
        FitnessSettings(pattern="2:4", sparsity=0.3)


def test_statistics_are_computed_once_per_run_folder(tmp_path):
    model = tiny_llama()
    settings = FitnessSettings(model="tiny", calibration=Calibration(nsamples=2, seqlen=32), seqlen=32, windows=1)
    src = SimpleNamespace(fingerprint="tiny-test")
    first = ModelFitness(settings, tmp_path, model, CharTokenizer(), src)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert any(f.startswith("gradients-") for f in files) and any(f.startswith("activations-") for f in files)
    stamp = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    second = ModelFitness(settings, tmp_path, model, CharTokenizer(), src)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == stamp
    for name in first.gradients:
        assert torch.equal(first.gradients[name], second.gradients[name])
        assert torch.equal(first.activations[name], second.activations[name])
    masks = score_masks(model, Tree.parse("W"), 0.5, Pattern())
    assert len(masks) == len(first.linears)


def test_gradients_are_computed_once_per_model_and_calibration_across_runs(tmp_path, private_cache, monkeypatch):
    model = tiny_llama()
    src = SimpleNamespace(fingerprint="tiny-test-shared")
    written = FitnessSettings(model="tiny", calibration=Calibration(split="validation", nsamples=2, seqlen=32),
                              seqlen=32, windows=1)
    first = ModelFitness(written, tmp_path / "run-a", model, CharTokenizer(), src)
    grads_a = statistics_paths(written, tmp_path / "run-a", src.fingerprint)[1]
    shared = private_cache / "gradients" / grads_a.name
    assert shared.is_file() and shared.read_bytes() == grads_a.read_bytes()  # the user's cache got a copy

    # another run that leaves the split to its default draws the same windows: G is not computed again
    import prunerzero.pruning.stats as stats

    def fail(*args, **kwargs):
        raise AssertionError("G computed a second time")

    monkeypatch.setattr(stats, "compute_gradients", fail)
    default = FitnessSettings(model="tiny", calibration=Calibration(nsamples=2, seqlen=32), seqlen=32, windows=1)
    second = ModelFitness(default, tmp_path / "run-b", model, CharTokenizer(), src)
    grads_b = statistics_paths(default, tmp_path / "run-b", src.fingerprint)[1]
    assert grads_b.name == grads_a.name and grads_b.read_bytes() == grads_a.read_bytes()
    for name in first.gradients:
        assert torch.equal(first.gradients[name], second.gradients[name])
    # a different calibration is a different file: computed, not taken from the cache
    other = FitnessSettings(model="tiny", calibration=Calibration(nsamples=2, seqlen=32, seed=1), seqlen=32, windows=1)
    with pytest.raises(AssertionError, match="second time"):
        ModelFitness(other, tmp_path / "run-c", model, CharTokenizer(), src)


def test_gradients_streamed_from_their_file_give_the_same_fitness(fitness):
    from prunerzero.pruning.stats import TensorFile

    assert isinstance(fitness.gradients, TensorFile)  # a CPU worker never holds all of G
    tree = Tree.parse("mul(abs(W), abs(G))")
    streamed = fitness.evaluate(tree).fitness
    fitness.gradients = {k: fitness.gradients[k].clone() for k in fitness.gradients}
    fitness.known_masks.clear()
    assert fitness.evaluate(tree).fitness == streamed


def test_layers_scored_side_by_side_give_the_reference_masks(tmp_path):
    from prunerzero.fitness.model_fitness import torch_threads

    model = tiny_llama()
    settings = FitnessSettings(model="tiny", calibration=Calibration(nsamples=2, seqlen=32), seqlen=32, windows=1)
    with torch_threads(2):  # a pool of layer threads exists only with several torch threads
        fitness = ModelFitness(settings, tmp_path, model, CharTokenizer(), SimpleNamespace(fingerprint="tiny-test"))
        assert fitness._layer_pool is not None
        grads = {k: fitness.gradients[k].clone() for k in fitness.gradients}
        for formula in ("mul(abs(W), sqrt(X))", "mul(sqr(W), mms(G))", "zsn(G)"):
            tree = Tree.parse(formula)
            masks = fitness.masks(tree)  # G read from its file by two threads at once
            assert torch.get_num_threads() == 2  # restored after the layers ran single-threaded
            expected = score_masks(model, tree, 0.5, Pattern(), fitness.activations, grads)
            assert set(masks) == set(expected)
            assert all(torch.equal(masks[n], expected[n]) for n in expected), formula
        assert "constant" in fitness.masks(Tree.parse("mms(sub(W, W))"))


def test_freed_memory_is_kept_for_the_next_candidate():
    """Large tensors freed and allocated again, as a forward pass does per candidate, reuse the
    memory instead of faulting it in. The heap grows to fit them over the first allocations (small
    objects land in between), and now and then again later: over the last allocations the setting
    faults in a fraction of what glibc does by default (it maps blocks this large afresh each time)."""
    import subprocess
    import sys

    code = (
        "import resource, sys, torch\n"
        "from prunerzero.memory import keep_freed_memory\n"
        "kept = keep_freed_memory() if sys.argv[1] == 'keep' else True\n"
        "faults = []\n"
        "for _ in range(12):\n"
        "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    a = torch.ones(40 << 18)  # 40 MiB: above glibc's largest dynamic mmap threshold\n"
        "    b = a[: 10 << 18] * 2\n"
        "    del a, b\n"
        "    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
        "print(kept, sum(faults[-6:]))\n"
    )
    out = {mode: subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, check=True).stdout.split()
           for mode in ("keep", "default")}
    if out["keep"][0] != "True":
        pytest.skip("the C library is not glibc: nothing to tune")
    default, kept = int(out["default"][1]), int(out["keep"][1])
    assert default > 6 * 9_000  # 40 MiB = 10,240 pages, faulted in again on every allocation
    assert kept < default / 3


def test_keeping_freed_memory_can_be_turned_off(monkeypatch):
    from prunerzero.memory import keep_freed_memory

    monkeypatch.setenv("PRUNERZERO_KEEP_FREED_MEMORY", "0")
    assert keep_freed_memory() is False


def test_a_long_batch_shows_it_is_moving(monkeypatch, caplog):
    from prunerzero.fitness import base

    monkeypatch.setattr(base, "PROGRESS_EVERY_S", -1.0)  # every tree counts as "a while"
    with caplog.at_level("INFO", logger="prunerzero.fitness.base"):
        assert list(base.with_progress(["a", "b", "c"])) == ["a", "b", "c"]
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(" (")[0] for line in lines] == ["1/3 trees of this batch evaluated", "2/3 trees of this batch evaluated"]
