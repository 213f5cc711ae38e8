import errno
import json
import os
import random

import pytest
import torch
import yaml
from deap import gp

from prunerzero.config import config_from_dict, load_config
from prunerzero.errors import UserError
from prunerzero.fitness.base import WORST_FITNESS
from prunerzero.fitness.reconstruction import ReconstructionEvaluator
from prunerzero.primitives.deap_set import primitive_set, to_tree
from prunerzero.primitives.registry import DEFAULT_OPERATORS
from prunerzero.primitives.tree import Tree
from prunerzero.pruning.masks import prune_mask
from prunerzero.runs import run_search
from prunerzero.search import checkpoint as ckpt
from prunerzero.search.simplify import Simplifier

simplify = Simplifier(ReconstructionEvaluator().same_ranking)


def recon_config(tmp_path, **search):
    return config_from_dict({
        "name": "t", "output_dir": str(tmp_path), "seed": 3,
        "search": {"population": 12, "generations": 4, **search},
        "evaluator": {"type": "reconstruction"},
    })


class CountingEvaluator(ReconstructionEvaluator):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.seen = []

    def evaluate(self, trees, budget=None):
        self.seen += [str(t) for t in trees]
        return super().evaluate(trees, budget)


def test_same_seed_same_search(tmp_path):
    a = run_search(recon_config(tmp_path / "a"))
    b = run_search(recon_config(tmp_path / "b"))
    assert a.log == b.log and a.population == b.population and a.hall_of_fame(10) == b.hall_of_fame(10)
    c = run_search(config_from_dict({**recon_config(tmp_path / "c").to_dict(), "seed": 4}))
    assert c.population != a.population


@pytest.mark.parametrize("algorithm", ["generational", "steady_state"])
def test_resume_equals_uninterrupted(tmp_path, algorithm):
    full = run_search(recon_config(tmp_path / "full", algorithm=algorithm, generations=5))
    cfg = recon_config(tmp_path / "split", algorithm=algorithm, generations=2)
    run_search(cfg)
    evaluator = CountingEvaluator(seed=3)
    resumed = run_search(cfg, resume=True, generations=5, evaluator=evaluator)
    assert resumed.log == full.log
    assert resumed.hall_of_fame(10) == full.hall_of_fame(10)
    assert resumed.population == full.population
    # the logs on disk agree as well, line for line
    assert (cfg.run_dir / ckpt.LOG).read_text() == (tmp_path / "full" / "t" / ckpt.LOG).read_text()
    # nothing evaluated before the interruption was evaluated again after it
    first = json.loads((tmp_path / "full" / "t" / ckpt.STATE).read_text())["cache"]
    before = {r["tree"] for r in first.values() if r["generation"] <= 2}
    assert not before & set(evaluator.seen)


def test_no_metric_is_evaluated_twice(tmp_path):
    evaluator = CountingEvaluator(seed=3)
    state = run_search(recon_config(tmp_path, generations=6), evaluator=evaluator)
    keys = [simplify(Tree.parse(t)).key for t in evaluator.seen]
    assert len(keys) == len(set(keys))
    assert state.counters["evaluated"] + state.counters["mask_cache_hits"] == len(evaluator.seen)
    assert state.counters["formula_cache_hits"] > 0 or state.counters["regenerated"] > 0
    row = state.log[-1]
    for key in ("best", "median", "unique_evaluated", "formula_cache_hits_this_gen", "evaluated_this_gen"):
        assert key in row


def test_bloat_limits_hold(tmp_path):
    state = run_search(recon_config(tmp_path, generations=6, max_height=4, max_size=9, init_max_depth=3,
                                    mutation_prob=0.9, crossover_prob=0.9))
    for record in state.cache.values():
        tree = Tree.parse(record["tree"])
        assert tree.height <= 4 and len(tree) <= 9, record["tree"]


def test_steady_state_keeps_population_size_and_improves(tmp_path):
    state = run_search(recon_config(tmp_path, algorithm="steady_state", generations=4, seed_known_metrics=False))
    assert len(state.population) == 12
    bests = [r["best"] for r in state.log]
    assert all(b2 <= b1 for b1, b2 in zip(bests, bests[1:]))


def test_simplification_never_changes_masks_on_random_trees():
    pset = primitive_set(list(DEFAULT_OPERATORS), ["W", "G", "X"])
    gen = torch.Generator().manual_seed(99)
    stats = {"W": torch.randn(12, 48, generator=gen).abs(), "G": torch.rand(12, 48, generator=gen) * 0.1,
             "X": torch.rand(1, 48, generator=gen) * 3}
    random.seed(7)
    changed = 0
    for _ in range(300):
        tree = to_tree(gp.genHalfAndHalf(pset, 1, 4))
        s = simplify(tree)
        if not s.changed:
            continue
        changed += 1
        a, b = tree.evaluate(stats), s.tree.evaluate(stats)
        for sp in (0.25, 0.5, 0.75):
            assert torch.equal(prune_mask(a, sp), prune_mask(b, sp)), (str(tree), str(s.tree))
    assert changed > 20  # OOS rewrote enough random trees for the check to mean something


@pytest.mark.parametrize("formula,expected", [
    ("exp(log(W))", "W"), ("log(exp(G))", "G"), ("sqrt(sqr(W))", "W"), ("sqr(sqrt(X))", "X"),
    ("neg(neg(W))", "W"), ("abs(abs(G))", "G"), ("mul(sqrt(W), sqrt(W))", "W"), ("add(W, sub(G, G))", "W"),
])
def test_opposing_operations_cancel(formula, expected):
    assert str(simplify(Tree.parse(formula)).tree) == expected


def test_constant_metrics_get_the_worst_fitness_without_evaluation(tmp_path):
    from prunerzero.search.engine import GeneticSearch
    from prunerzero.search.state import SearchState

    ev = CountingEvaluator()
    search = GeneticSearch(recon_config(tmp_path).search, ev, 0, SearchState())
    key, = search.evaluate([Tree.parse("sub(W, W)")], 0)
    assert search.state.cache[key]["fitness"] == WORST_FITNESS and "constant" in search.state.cache[key]["reason"]
    assert ev.seen == []


def test_multi_fidelity_promotes_the_best_and_never_ranks_the_rest_above_them(tmp_path):
    from prunerzero.fitness.multi_fidelity import MultiFidelityEvaluator
    from prunerzero.search.engine import GeneticSearch

    inner = CountingEvaluator()  # full budget: 8 blocks of 32 rows
    ev = MultiFidelityEvaluator(inner, low_budget=2, promote=0.25)
    pset = primitive_set(list(DEFAULT_OPERATORS), ["W", "G", "X"])
    random.seed(1)
    trees = list({str(t): t for t in (to_tree(gp.genHalfAndHalf(pset, 1, 3)) for _ in range(24))}.values())
    results = ev.evaluate(trees)
    low = inner.evaluate(trees, 2)
    rankable = [i for i, r in enumerate(low) if r.reason is None]
    promoted = [i for i, r in enumerate(results) if r.low_fitness is not None and not r.estimated]
    distinct = {low[i].mask_key for i in rankable}
    assert len({low[i].mask_key for i in promoted}) == -(-len(distinct) // 4)  # ceil(0.25 * distinct mask sets)
    worst_promoted_low = max(low[i].fitness for i in promoted)
    for i in rankable:
        assert results[i].low_fitness == low[i].fitness  # the low rung is a real measurement
        if i in promoted:  # measured again on the full budget
            assert results[i].budget is None and results[i].fitness == inner.evaluate([trees[i]])[0].fitness
        else:  # stopped on the low rung: worse there than every promoted tree, and ranked below them
            assert results[i].estimated and low[i].fitness >= worst_promoted_low
            assert results[i].fitness >= max(results[j].fitness for j in promoted)
    # in a search: counters record the saving, and estimated fitnesses never reach the hall of fame
    search = GeneticSearch(recon_config(tmp_path).search, MultiFidelityEvaluator(CountingEvaluator(), 2, 0.25), 0)
    state = search.run(2)
    assert state.counters["promoted"] > 0 and state.counters["stopped_low"] > state.counters["promoted"]
    assert not any(r.get("estimated") for r in state.hall_of_fame(10))
    assert any(r.get("estimated") for r in state.cache.values())


def test_config_validation_names_the_problem(tmp_path):
    cases = [
        ({"search": {"popluation": 5}}, "did you mean 'population'"),
        ({"search": {"population": "ten"}}, "search.population must be int"),
        ({"fitness": {"sparsity": 1.2}}, "outside (0, 1)"),
        ({"fitness": {"pattern": "2:4", "sparsity": 0.7}}, "prunes exactly 0.5"),
        ({"fitness": {"split": "test"}}, "held out for the final tables"),
        ({"search": {"operators": ["mul", "pow3"]}}, "unknown 'pow3'; did you mean 'pow'"),
        ({"search": {"crossover_prob": 2}}, "within [0, 1]"),
        ({"search": {"elites": 30, "population": 10}}, "search.elites"),
        ({"evaluator": {"type": "gpu-cloud"}}, "evaluator.type"),
        ({"colour": "blue"}, "unknown key 'colour'"),
        ({"fitness": {"windows": 4, "multi_fidelity": {"low_windows": 4}}}, "low_windows must be within [1, fitness.windows - 1 = 3]"),
        ({"fitness": {"windows": 4, "multi_fidelity": {"promote": 1.5}}}, "promote must be a fraction"),
        ({"fitness": {"windows": 4, "multi_fidelity": {"low_window": 1}}}, "did you mean 'low_windows'"),
    ]
    for data, message in cases:
        with pytest.raises(UserError, match=None) as e:
            config_from_dict(data)
        assert message in str(e.value), (data, str(e.value))
    bad = tmp_path / "bad.yaml"
    bad.write_text("search: [unclosed")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "none.yaml")


def test_every_shipped_config_validates_and_dry_run_loads_nothing(capsys, tmp_path, monkeypatch):
    from pathlib import Path

    import prunerzero.cli.search as search_cli
    from prunerzero.cli import main

    def no_search(*_a, **_k):
        raise AssertionError("--dry-run started a search")

    monkeypatch.setattr(search_cli, "run_search", no_search)
    configs = sorted(Path("configs").resolve().glob("*.yaml"))
    assert len(configs) >= 12
    monkeypatch.chdir(tmp_path)  # run folders would go under tmp_path/runs; none is made
    for path in configs:
        assert main(["search", "--config", str(path), "--dry-run"]) == 0, path.name
        out = json.loads(capsys.readouterr().out)
        assert out["valid"] and out["fingerprint"]["fitness"]["model"], path.name
        assert out["run_dir"].endswith(yaml.safe_load(path.read_text())["name"]), path.name
    assert list(tmp_path.iterdir()) == []


def test_resume_refuses_a_changed_search_space_unless_forced(tmp_path):
    cfg = recon_config(tmp_path, generations=1)
    run_search(cfg)
    changed = config_from_dict({**cfg.to_dict(), "search": {**cfg.to_dict()["search"], "operators": [*cfg.search.operators, "sigmoid"]}})
    with pytest.raises(UserError, match="the config changed"):
        run_search(changed, resume=True, generations=2)
    with pytest.raises(UserError, match="already holds a search"):
        run_search(cfg)
    state = run_search(changed, resume=True, generations=2, force=True)
    assert state.generation == 2


def test_crash_mid_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    cfg = recon_config(tmp_path, generations=2)
    run_search(cfg)
    before = (cfg.run_dir / ckpt.STATE).read_text()

    def crash(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(UserError, match="no space left") as e:  # one line, exit status 1
        run_search(cfg, resume=True, generations=3)
    assert e.value.status == 1
    assert not [p.name for p in cfg.run_dir.iterdir() if p.name.endswith(".tmp")]  # no temporary file left
    monkeypatch.undo()
    assert (cfg.run_dir / ckpt.STATE).read_text() == before
    state, _ = ckpt.load_checkpoint(cfg.run_dir)
    assert state.generation == 2


def test_export_writes_loadable_pruner_zero_trees(tmp_path, capsys):
    from prunerzero.cli import main

    cfg = recon_config(tmp_path, generations=2)
    run_search(cfg)
    out = tmp_path / "best.json"
    assert main(["export", str(cfg.run_dir), "--top", "3", "--out", str(out), "--tree-files"]) == 0
    data = json.loads(out.read_text())
    assert len(data["trees"]) == 3
    assert [t["fitness"] for t in data["trees"]] == sorted(t["fitness"] for t in data["trees"])
    best = Tree.load(out)
    assert str(best) == data["trees"][0]["formula"]
    assert Tree.load(tmp_path / "best-rank1.json") == best
    assert (cfg.run_dir / ckpt.PLOT).stat().st_size > 1000
    assert main(["export", str(tmp_path / "nothing")]) == 2


@pytest.mark.integration
def test_two_generations_on_the_real_model(tmp_path, smollm2):
    from prunerzero.fitness.model_fitness import InProcessEvaluator, ModelFitness
    from prunerzero.runfolder import fitness_settings

    model, tokenizer, source = smollm2
    cfg = config_from_dict({
        "name": "real", "output_dir": str(tmp_path), "seed": 0,
        "model": {"name": "smollm2-135m", "device": "cpu"},
        "calibration": {"nsamples": 2, "seqlen": 128},
        "fitness": {"seqlen": 128, "windows": 1},
        "search": {"population": 4, "generations": 1, "init_max_depth": 2, "elites": 1},
    })
    fitness = ModelFitness(fitness_settings(cfg), cfg.run_dir, model, tokenizer, source)
    state = run_search(cfg, evaluator=InProcessEvaluator(fitness_settings(cfg), cfg.run_dir, fitness))
    assert state.generation == 1 and len(state.log) == 2
    best = state.hall_of_fame(1)[0]
    assert 1 < best["fitness"] < 1e4
    assert list(tmp_path.glob("real/activations-*.safetensors")) and list(tmp_path.glob("real/gradients-*.safetensors"))


def test_resume_seeds_the_mask_cache_with_measured_fitnesses_only(tmp_path):
    from prunerzero.runs import known_masks
    from prunerzero.search.state import SearchState

    cfg = config_from_dict({"fitness": {"windows": 4, "multi_fidelity": {"low_windows": 1, "promote": 0.5}}})
    state = SearchState()
    state.cache = {
        "a": {"tree": "abs(W)", "fitness": 30.0, "low_fitness": 25.0, "mask_key": "ka"},  # promoted
        "b": {"tree": "G", "fitness": 90.0, "low_fitness": 60.0, "estimated": True, "mask_key": "kb"},
        "c": {"tree": "X", "fitness": WORST_FITNESS, "reason": "constant"},
    }
    assert known_masks(state, cfg) == {"ka": 30.0, "ka@1": 25.0, "kb@1": 60.0}


def test_multi_fidelity_spends_no_promotion_on_masks_already_measured():
    from prunerzero.fitness.multi_fidelity import MultiFidelityEvaluator

    inner = CountingEvaluator()
    ev = MultiFidelityEvaluator(inner, low_budget=2, promote=0.5)
    first = ev.evaluate(trees_of("mul(abs(W), X)", "abs(W)"))
    assert first[0].estimated is None and first[0].low_fitness is not None  # promoted: 1 of 2 mask sets
    # same masks as the promoted tree (a monotone transform), plus two new mask sets
    again = ev.evaluate(trees_of("sqrt(mul(abs(W), X))", "G", "mul(G, X)"))
    assert again[0].fitness == first[0].fitness and again[0].cached == "mask" and not again[0].estimated
    assert sum(1 for r in again[1:] if not r.estimated) == 1  # ceil(0.5 * 2 new mask sets)


def trees_of(*formulas):
    return [Tree.parse(f) for f in formulas]


def test_seed_trees_are_in_generation_zero_and_bad_seeds_are_refused(tmp_path):
    seeds = ["mul(abs(W), sqr(X))", "wanda", "sub(W, mul(G, X))"]
    state = run_search(recon_config(tmp_path, generations=1, seed_known_metrics=False, seed_trees=seeds))
    first = {r["tree"] for r in state.cache.values() if r["generation"] == 0}
    for spec in seeds:
        tree = Tree.parse("mul(abs(W), sqrt(X))" if spec == "wanda" else spec)
        assert str(simplify(tree).tree) in first, spec
    cases = [
        ({"seed_trees": ["mul(abs(W), B)"]}, "seed_trees[0]: mul(abs(W), B) reads allocation feature"),
        ({"seed_trees": ["mul(W", "W"]}, "seed_trees[0]"),
        ({"seed_trees": ["W", "pow(W, 0.5)"]}, "seed_trees[1] pow(W, 0.5) uses pow, 0.5"),
        ({"seed_trees": ["mul(W, W)"], "operators": ["add", "abs"]}, "uses mul, not in this search's"),
        ({"seed_trees": ["W"] * 13}, "more than search.population (12)"),
        ({"seed_trees": "W"}, "seed_trees must be a list of formulas"),
        ({"seed_trees": ["abs(abs(abs(W)))"], "max_height": 2, "init_max_depth": 2}, "beyond search.max_height 2"),
    ]
    for search, message in cases:
        with pytest.raises(UserError) as e:
            recon_config(tmp_path, **search)
        assert message in str(e.value), (search, str(e.value))
    # the default operators seed 3 known metrics (RIA needs rown, coln): 3 + 10 distinct seeds > 12
    distinct = [f"{op}({a}, {b})" for op in ("add", "sub", "mul") for a, b in (("W", "X"), ("W", "G"), ("X", "G"))]
    with pytest.raises(UserError, match="generation 0 would hold 13 known metrics and seed trees"):
        run_search(recon_config(tmp_path / "full", seed_trees=[*distinct, "div(W, X)"]))


def test_a_search_whose_trees_never_read_g_never_computes_it(tmp_path):
    from tests.conftest import local_data, tiny_model_folder

    model = str(tiny_model_folder(tmp_path / "m"))
    data = str(local_data(tmp_path / "d"))

    def search(name, terminals):
        cfg = config_from_dict({
            "name": name, "output_dir": str(tmp_path), "seed": 1, "model": {"name": model, "device": "cpu"},
            "calibration": {"nsamples": 2, "seqlen": 32, "data_dir": data},
            "fitness": {"seqlen": 32, "windows": 2},
            "search": {"population": 4, "generations": 1, "terminals": terminals, "init_max_depth": 2}})
        state = run_search(cfg)
        return state, sorted(p.name.split("-")[0] for p in (tmp_path / name).glob("*.safetensors"))

    state, files = search("wx", ["W", "X"])
    assert files == ["activations"]  # X only: no gradients file, nothing spent on G
    assert all(r["fitness"] < WORST_FITNESS for r in state.cache.values() if "reason" not in r)
    _, files = search("wxg", ["W", "X", "G"])
    assert files == ["activations", "gradients"]


@pytest.mark.parametrize("algorithm", ["generational", "steady_state"])
def test_time_budget_stops_at_a_checkpoint_and_resumes_exactly(tmp_path, algorithm):
    full = run_search(recon_config(tmp_path / "full", algorithm=algorithm, generations=4))
    cfg = recon_config(tmp_path / "split", algorithm=algorithm, generations=4)
    # a budget already spent: each call still completes one generation, then stops at its checkpoint
    assert run_search(cfg, max_minutes=1e-9).generation == 0
    assert json.loads((cfg.run_dir / ckpt.STATE).read_text())["generation"] == 0
    assert run_search(cfg, resume=True, max_minutes=1e-9).generation == 1
    resumed = run_search(cfg, resume=True)
    assert resumed.generation == 4
    assert resumed.log == full.log and resumed.population == full.population
    assert (cfg.run_dir / ckpt.LOG).read_text() == (tmp_path / "full" / "t" / ckpt.LOG).read_text()


@pytest.mark.parametrize("minutes", [0, -1, float("inf"), float("nan")])
def test_time_budget_must_be_positive_and_finite(tmp_path, minutes):
    with pytest.raises(UserError, match="--max-minutes must be a positive number"):
        run_search(recon_config(tmp_path), max_minutes=minutes)
    assert not (tmp_path / "t").exists()


def _twins(state):
    """Members of the population beyond the first of each mask (0: every member prunes differently)."""
    keys = [state.cache[simplify(Tree.parse(f)).key]["mask_key"] for f in state.population]
    return len(keys) - len(set(keys))


@pytest.mark.parametrize("search", [
    {"algorithm": "steady_state", "batch": 2},
    {"algorithm": "steady_state", "in_flight": 3},
])
def test_distinct_masks_keeps_mask_twins_out_of_the_population_and_resumes_exactly(tmp_path, search):
    opts = dict(search, generations=6, steps_per_generation=6, seed_known_metrics=True, top_k=4,
                operators=["abs", "sqr", "sqrt", "mul", "div", "add"], terminals=["W", "X"])
    plain = run_search(recon_config(tmp_path / "plain", **opts))
    distinct = run_search(recon_config(tmp_path / "distinct", distinct_masks=True, **opts))
    # formula-distinct copies of one ranking (sqr(W) for abs(W), mul(X, sqr(W)) for Wanda) pile up
    # without the option; with it, twins bred later never enter: the ones left came with generation 0
    assert distinct.counters["mask_twins"] > 0 and plain.counters["mask_twins"] == 0
    assert _twins(plain) > _twins(distinct)
    initial = [r["mask_key"] for r in distinct.cache.values() if r["generation"] == 0]
    assert _twins(distinct) <= len(initial) - len(set(initial))
    assert len(distinct.population) == 12
    # split in two with --max-minutes, the run is the same line for line
    split = recon_config(tmp_path / "split", distinct_masks=True, **opts)
    run_search(split, max_minutes=1e-9)
    resumed = run_search(split, resume=True)
    assert resumed.log == distinct.log and resumed.population == distinct.population


def test_distinct_masks_needs_the_steady_state_and_is_part_of_the_resume_fingerprint(tmp_path):
    with pytest.raises(UserError, match="distinct_masks needs search.algorithm: steady_state"):
        run_search(recon_config(tmp_path / "g", distinct_masks=True))
    cfg = recon_config(tmp_path, algorithm="steady_state", generations=1)
    run_search(cfg)
    changed = recon_config(tmp_path, algorithm="steady_state", generations=2, distinct_masks=True)
    with pytest.raises(UserError, match="distinct_masks"):
        run_search(changed, resume=True)
    assert run_search(changed, resume=True, force=True).generation == 2


def test_stalled_reads_the_best_of_the_last_generations():
    from prunerzero.search.state import stalled
    log = [{"best": b} for b in (10.0, 9.0, 9.0, 9.0)]
    assert not stalled(log, None) and not stalled(log, 4)  # off, or fewer generations than the patience
    assert stalled(log, 2) and not stalled(log, 3)  # 9.0 since generation 1: two generations without a gain
    assert not stalled(log[:2] + [{"best": 8.99}], 1)
    assert stalled(log[:2] + [{"best": 8.99}], 1, min_improvement=0.01)  # 0.1% is less than the 1% asked for
    assert not stalled([{"best": None}, {"best": 5.0}], 1)


def _first_stall(log, patience):
    from prunerzero.search.state import stalled
    return next((g for g in range(len(log)) if stalled(log[:g + 1], patience)), None)


@pytest.mark.parametrize("search", [  # the generational loop stops through the same code as the first
    {"algorithm": "steady_state", "batch": 2},
    {"algorithm": "steady_state", "in_flight": 3},
])
def test_patience_stops_where_the_best_stopped_improving_and_resumes_exactly(tmp_path, search):
    opts = dict(search, generations=5, steps_per_generation=3, top_k=4)
    full = run_search(recon_config(tmp_path / "full", **opts))
    stop = _first_stall(full.log, 1)
    assert stop is not None and stop < 5, [r["best"] for r in full.log]  # the case under test happens
    cfg = recon_config(tmp_path / "p", patience=1, **opts)
    stopped = run_search(cfg)
    assert stopped.generation == stop  # a checkpoint: the same generations as the uninterrupted run, no more
    assert stopped.log == full.log[:stop + 1]
    # split by the time budget, it stops at the same generation
    split = recon_config(tmp_path / "split", patience=1, **opts)
    run_search(split, max_minutes=1e-9)
    assert run_search(split, resume=True).log == stopped.log
    # resumed as it is, nothing more is done; with more patience it goes on as the full run did
    assert run_search(cfg, resume=True).generation == stop
    more = config_from_dict({**cfg.to_dict(), "search": {**cfg.to_dict()["search"], "patience": 20}})
    longer = run_search(more, resume=True)
    assert longer.log == full.log and longer.population == full.population


@pytest.mark.parametrize("bad, message", [
    ({"patience": 0}, "search.patience must be a whole number of generations, at least 1"),
    ({"patience": 2.5}, "search.patience must be "),
    ({"patience": True}, "search.patience must be "),
    ({"patience": 3, "min_improvement": 1.5}, "search.min_improvement must be a fraction within"),
    ({"min_improvement": -0.1}, "search.min_improvement must be a fraction within"),
])
def test_patience_settings_are_checked(tmp_path, bad, message):
    with pytest.raises(UserError, match=message):
        run_search(recon_config(tmp_path, **bad))
    assert not (tmp_path / "t").exists()
