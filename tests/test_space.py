"""The extended search space: axis-wise operators, constants and pow, RIA, and sound OOS."""

import json

import pytest
import torch

from prunerzero.config import config_from_dict
from prunerzero.errors import UserError
from prunerzero.fitness.reconstruction import ReconstructionEvaluator
from prunerzero.models import prunable_linears
from prunerzero.primitives.deap_set import primitive_set, repair_pow, to_tree
from prunerzero.primitives.known import KNOWN_METRICS, known_tree, resolve_tree
from prunerzero.primitives.registry import EXTENDED_OPERATORS
from prunerzero.primitives.tree import Tree
from prunerzero.pruning.equivalence import same_masks, synthetic_probes
from prunerzero.pruning.layerwise import iterate_blocks
from prunerzero.pruning.masks import Pattern, prune_mask
from prunerzero.pruning.prune import prune_model
from prunerzero.runs import run_search
from prunerzero.search.simplify import Simplifier
from tests.conftest import tiny_llama


def test_axis_operators_normalise_along_rows_and_columns():
    gen = torch.Generator().manual_seed(0)
    w = torch.rand(5, 7, generator=gen)
    x = torch.rand(1, 7, generator=gen) + 0.1
    stats, shape = {"W": w, "X": x}, w.shape
    assert torch.allclose(Tree.parse("rown(W)").evaluate(stats, shape), w / w.sum(1, keepdim=True))
    assert torch.allclose(Tree.parse("coln(W)").evaluate(stats, shape), w / w.sum(0, keepdim=True))
    std, mean = torch.std_mean(w, dim=1, keepdim=True)
    assert torch.allclose(Tree.parse("rowz(W)").evaluate(stats, shape), (w - mean) / std)
    std, mean = torch.std_mean(w, dim=0, keepdim=True)
    assert torch.allclose(Tree.parse("colz(W)").evaluate(stats, shape), (w - mean) / std)
    # X (1, in) is broadcast to the layer first: the same row for every output
    assert torch.allclose(Tree.parse("rown(X)").evaluate(stats, shape), (x / x.sum()).expand(shape))
    assert torch.allclose(Tree.parse("coln(X)").evaluate(stats, shape), torch.full(shape, 1 / 5))
    assert torch.equal(Tree.parse("colz(X)").evaluate(stats, shape), torch.zeros(shape))
    # an all-zero row or column gives zeros, never NaN
    z = torch.zeros(3, 4)
    for op in ("rown", "coln", "rowz", "colz"):
        out = Tree.parse(f"{op}(W)").evaluate({"W": z}, z.shape)
        assert torch.equal(out, torch.zeros(3, 4)), op


def test_constants_and_pow_in_every_form(tmp_path):
    t = Tree.parse("mul(W, pow(X, 0.25))")
    assert str(t) == "mul(W, pow(X, 0.25))" and t.constants == {"0.25"}
    assert Tree.parse("mul(W, pow(X, .250))") == t  # numbers are read, then written canonically
    data = t.to_json()
    assert data["right"]["right"] == {"data": 0.25}
    assert Tree.from_json(json.loads(json.dumps(data))) == t
    w, x = torch.rand(3, 4), torch.rand(1, 4)
    assert torch.allclose(t.evaluate({"W": w, "X": x}, w.shape), w * x**0.25)
    assert str(Tree.from_sympy(t.to_sympy())) == "mul(W, sqrt(sqrt(X)))"  # expressible without pow
    t3 = Tree.parse("mul(W, pow(X, 0.75))")
    assert str(Tree.from_sympy(t3.to_sympy())) == "mul(W, pow(X, 0.75))"
    assert Tree.parse("add(W, 2)").evaluate({"W": w}, w.shape).sub(2).allclose(w)


@pytest.mark.parametrize("bad,message", [
    ("pow(X, 0.3)", "unknown constant '0.3' at position 2"),
    ("pow(X, W)", r"pow at root needs a constant exponent"),
    ("mul(W, pow(X, G))", r"pow at root\.right needs a constant exponent"),
])
def test_bad_constants_name_their_place(bad, message):
    with pytest.raises(UserError, match=message):
        Tree.parse(bad)


def test_bad_constant_in_json_names_its_place():
    with pytest.raises(UserError, match=r"unknown constant 0\.3 at root\.right"):
        Tree.from_json({"data": "pow", "left": {"data": "X"}, "right": {"data": 0.3}})
    with pytest.raises(UserError, match=r"search\.constants: unknown constant"):
        config_from_dict({"search": {"constants": [0.3]}})
    with pytest.raises(UserError, match="pow, which needs constant exponents"):
        config_from_dict({"search": {"operators": ["mul", "pow"]}})


def test_repair_gives_every_pow_a_constant_exponent():
    import random

    pset = primitive_set(list(EXTENDED_OPERATORS), ["W", "G", "X"], ["0.5", "2"])
    from deap import gp

    from prunerzero.primitives.deap_set import Individual

    random.seed(1)
    seen_pow = 0
    for _ in range(300):
        ind = repair_pow(Individual(gp.genHalfAndHalf(pset, 1, 4)), pset)
        tree = to_tree(ind)  # raises if a pow has a non-constant exponent
        seen_pow += "pow" in tree.operators
    assert seen_pow > 10


def _ria_reference(weight: torch.Tensor, scaler_row: torch.Tensor) -> torch.Tensor:
    """RIA as its paper writes it, computed independently of the tree."""
    w = weight.abs()
    relative = w / w.sum(dim=0, keepdim=True) + w / w.sum(dim=1, keepdim=True)
    return relative * scaler_row.reshape(1, -1).sqrt() ** 0.5


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_ria_method_and_tree_give_the_reference_masks(windows, pattern):
    pat = Pattern.parse(pattern)
    a, b, ref = tiny_llama(), tiny_llama(), tiny_llama()
    prune_model(a, "ria", 0.5, pat, windows=windows)
    prune_model(b, "tree", 0.5, pat, windows=windows, tree=known_tree("ria"))
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)
    # the reference: X collected block by block on the partly pruned model, masks per row / group
    def on_block(_i, linears, stats):
        for short, lin in linears.items():
            mask = prune_mask(_ria_reference(lin.weight.data, stats[short].scaler_row), 0.5, pat)
            lin.weight.data[mask] = 0
        return True

    iterate_blocks(ref, windows, on_block)
    for (n, x), y in zip(a.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(x, y), n
    # and the comparison was of pruned models: every linear of the decoder at half its weights
    for n, lin in prunable_linears(ref).items():
        assert (lin.weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.02), n


def test_magnitude_method_ranks_the_whole_layer_like_the_reference():
    model = tiny_llama()
    dense = {n: l.weight.detach().clone() for n, l in prunable_linears(model).items()}
    prune_model(model, "magnitude", 0.5, Pattern())
    for name, lin in prunable_linears(model).items():
        w = dense[name].abs()
        thresh = torch.sort(w.flatten()).values[int(w.numel() * 0.5)]
        assert torch.equal(lin.weight == 0, w <= thresh), name


def test_known_metrics_resolve_by_name_and_seed_the_search(tmp_path):
    assert set(KNOWN_METRICS) >= {"magnitude", "wanda", "ria", "pruner-zero"}
    assert resolve_tree("ria") == Tree.parse("mul(add(coln(W), rown(W)), sqrt(sqrt(X)))")
    long_formula = "mul(W, " * 40 + "X" + ")" * 40  # longer than a file name may be: still a formula
    assert len(resolve_tree(long_formula)) == 81
    with pytest.raises(UserError, match="is a directory"):
        resolve_tree(str(tmp_path))
    cfg = config_from_dict({"name": "t", "output_dir": str(tmp_path), "search": {
        "population": 8, "generations": 1, "operators": list(EXTENDED_OPERATORS), "constants": [0.5]},
        "evaluator": {"type": "reconstruction"}})
    state = run_search(cfg)
    seeded = {r["tree"] for r in state.cache.values() if r["generation"] == 0}
    assert any("rown" in t and "coln" in t for t in seeded), seeded  # RIA is in the first population


def test_same_masks_checks_the_runs_pattern():
    # equal masks per row at 30/50/70%, but a different pair inside the second group of four
    w = torch.tensor([[1.0, 2, 3, 4, 5, 6, 7, 8]])
    x = torch.tensor([[1.0, 1, 1, 1, 1, 7 / 6, 6 / 7, 1]])
    probe = [{"W": w, "X": x, "G": w}]
    a, b = Tree.parse("W"), Tree.parse("mul(W, X)")
    assert same_masks(a, b, probe, Pattern())
    assert not same_masks(a, b, probe, Pattern(2, 4))
    ev = ReconstructionEvaluator(pattern="2:4")
    ev._probes = probe
    assert not ev.same_ranking(a, b)


@pytest.mark.parametrize("formula,expected", [
    ("mul(W, exp(log(X)))", {"mul(W, X)", "mul(X, W)"}),
    ("mul(sqrt(W), exp(log(X)))", {"mul(sqrt(W), X)", "mul(X, sqrt(W))"}),
    ("add(mul(W, X), sub(G, G))", {"mul(W, X)", "mul(X, W)"}),
    ("mul(W, sqr(sqrt(mul(X, X))))", {"mul(W, sqr(X))"}),
])
def test_opposing_operations_cancel_inside_products(formula, expected):
    simplify = Simplifier(ReconstructionEvaluator().same_ranking)
    s = simplify(Tree.parse(formula))
    assert s.changed and str(s.tree) in expected


def test_a_cancellation_the_guards_contradict_is_refused():
    # exp clamps at 100 and real X reaches 1e5: log(exp(X)) is not X where it matters
    s = Simplifier(ReconstructionEvaluator().same_ranking)(Tree.parse("mul(W, log(exp(X)))"))
    assert not s.changed and s.key.startswith("tree:")


def test_probes_have_the_scale_of_real_statistics():
    for probe in synthetic_probes():
        assert probe["X"].max() > 1e3 and probe["X"].min() < 1
        assert probe["W"].max() < 1


def test_simplified_trees_keep_the_bloat_limits():
    tree = Tree.parse("add(sub(G, X), sqrt(G))")  # SymPy: sqrt(G) + G - X, as long but taller
    free = Simplifier(ReconstructionEvaluator().same_ranking)(tree)
    assert free.changed and free.tree.height == 3 > tree.height == 2
    limited = Simplifier(ReconstructionEvaluator().same_ranking, max_height=2)(tree)
    assert not limited.changed and limited.tree == tree and limited.key == free.key


def test_search_with_the_extended_space_resumes_exactly(tmp_path):
    def cfg(root, generations):
        return config_from_dict({"name": "t", "output_dir": str(root), "seed": 5, "search": {
            "population": 12, "generations": generations, "operators": list(EXTENDED_OPERATORS),
            "constants": [0.25, 0.5, 2], "seed_known_metrics": False}, "evaluator": {"type": "reconstruction"}})

    full = run_search(cfg(tmp_path / "full", 5))
    run_search(cfg(tmp_path / "split", 2))
    resumed = run_search(cfg(tmp_path / "split", 5), resume=True)
    assert resumed.log == full.log and resumed.population == full.population
    used = set().union(*(Tree.parse(r["tree"]).operators for r in full.cache.values()))
    assert used & {"rown", "coln", "rowz", "colz", "pow"}
    for record in full.cache.values():
        t = Tree.parse(record["tree"])
        assert t.height <= 8 and len(t) <= 31


def test_steady_state_one_child_at_a_time_replaces_the_worst(tmp_path):
    class Recording(ReconstructionEvaluator):
        batches = []

        def evaluate(self, trees, budget=None):
            self.batches.append([str(t) for t in trees])
            return super().evaluate(trees, budget)

    def cfg(root, generations, batch):
        return config_from_dict({"name": "t", "output_dir": str(root), "seed": 2, "search": {
            "algorithm": "steady_state", "population": 10, "generations": generations, "top_k": 4,
            "steps_per_generation": 6, "batch": batch}, "evaluator": {"type": "reconstruction"}})

    ev = Recording(seed=2)
    state = run_search(cfg(tmp_path / "one", 3, 1), evaluator=ev)
    assert all(len(b) <= 1 for b in ev.batches[1:])  # after the initial population, one child per evaluation
    bests = [r["best"] for r in state.log]
    assert all(b2 <= b1 for b1, b2 in zip(bests, bests[1:])) and len(state.population) == 10
    # resumable at generation boundaries, exactly
    run_search(cfg(tmp_path / "split", 1, 1))
    resumed = run_search(cfg(tmp_path / "split", 3, 1), resume=True)
    assert resumed.log == state.log and resumed.population == state.population
    # children of a batch never copy each other
    ev.batches.clear()
    run_search(cfg(tmp_path / "three", 3, 3), evaluator=ev)
    simplify = Simplifier(ReconstructionEvaluator().same_ranking)
    for b in ev.batches[1:]:
        keys = [simplify(Tree.parse(t)).key for t in b]
        assert len(keys) == len(set(keys))


def test_constants_only_as_exponents_when_asked(tmp_path):
    cfg = config_from_dict({"name": "t", "output_dir": str(tmp_path), "seed": 1, "search": {
        "population": 16, "generations": 3, "operators": list(EXTENDED_OPERATORS), "constants": [0.5, 2],
        "constants_as_leaves": False, "seed_known_metrics": False}, "evaluator": {"type": "reconstruction"}})
    state = run_search(cfg)
    for r in state.cache.values():
        nodes = Tree.parse(r["tree"]).nodes
        for i, n in enumerate(nodes):
            if n in ("0.5", "2"):
                assert nodes[:i].count("pow") > 0, r["tree"]  # a constant only ever under a pow


def test_fitness_windows_never_overlap_calibration_windows(monkeypatch):
    from prunerzero import data

    n = 5000
    monkeypatch.setattr(data, "joined_tokens", lambda *a, **k: torch.arange(n))  # every token id is its position
    calib = data.calibration_windows(None, "wikitext2", 8, 256, 3)
    fit = data.fitness_tokens(None, "wikitext2", "validation", 128, 10, ("wikitext2", None, 8, 256, 3))
    assert fit.numel() == 1280 and len(set(fit.tolist())) == 1280
    assert not set(fit.tolist()) & set(calib.flatten().tolist())
    # each fitness window is contiguous text
    for w in fit.reshape(10, 128):
        assert torch.equal(w, torch.arange(int(w[0]), int(w[0]) + 128))
    with pytest.raises(UserError, match="room for only"):
        data.fitness_tokens(None, "wikitext2", "validation", 1000, 10, ("wikitext2", None, 8, 256, 3))
    with pytest.raises(UserError, match="could overlap"):
        config_from_dict({"calibration": {"source": "c4", "split": "train"}, "fitness": {"text": "c4", "split": "train"}})
