"""The steady state without a generation barrier (``search.in_flight``): children are bred as
results come in, yet the run depends on its seed and N only, and resumes exactly."""

from __future__ import annotations

import json
import random

import pytest

from prunerzero.config import config_from_dict
from prunerzero.errors import UserError
from prunerzero.fitness.reconstruction import ReconstructionEvaluator
from prunerzero.primitives.tree import Tree
from prunerzero.runs import run_search
from prunerzero.search.checkpoint import load_checkpoint
from prunerzero.search.engine import GeneticSearch
from prunerzero.search.simplify import Simplifier


def cfg(root, generations=4, in_flight=3, **search):
    return config_from_dict({"name": "t", "output_dir": str(root), "seed": 7, "search": {
        "algorithm": "steady_state", "population": 10, "generations": generations, "top_k": 4,
        "steps_per_generation": 5, "in_flight": in_flight, "seed_known_metrics": False, **search},
        "evaluator": {"type": "reconstruction"}})


class Scrambled(ReconstructionEvaluator):
    """Finishes a random subset of the submitted trees, in a random order, at each wait: what
    workers of unequal speed do. Records how many trees were out at once."""

    def __init__(self, order_seed: int):
        super().__init__(seed=7)  # the config's seed: the same fitness as run_search's own evaluator
        self.rng = random.Random(order_seed)  # its own stream: the search's must not be touched
        self.out: dict[int, Tree] = {}
        self.most_out = 0
        self.batches: list[int] = []

    def submit(self, tree):
        ticket = self.rng.randrange(10**9)  # tickets are opaque: not in submission order
        while ticket in self.out:
            ticket += 1
        self.out[ticket] = tree
        self.most_out = max(self.most_out, len(self.out))
        return ticket

    def wait_any(self):
        done = self.rng.sample(sorted(self.out), self.rng.randint(1, len(self.out)))
        self.batches.append(len(done))
        return {t: self.evaluate([self.out.pop(t)])[0] for t in done}


def same_run(a, b) -> bool:
    return a.log == b.log and a.population == b.population and a.cache == b.cache and a.pending == b.pending


def test_in_flight_does_not_depend_on_when_results_come_in(tmp_path):
    plain = run_search(cfg(tmp_path / "plain"))
    for seed in (1, 2):
        ev = Scrambled(seed)
        scrambled = run_search(cfg(tmp_path / f"scrambled{seed}"), evaluator=ev)
        assert same_run(plain, scrambled)
        assert ev.most_out == 3  # always N children out (after the initial population)
        assert max(ev.batches) > 1  # several finished at once, in another order than bred
    assert plain.generation == 4 and len(plain.population) == 10
    assert len(plain.pending) == 2  # bred, not yet placed: what a resume sends again
    bests = [r["best"] for r in plain.log]
    assert all(b2 <= b1 for b1, b2 in zip(bests, bests[1:]))
    # a different N is a different run (N is part of what the run means)
    assert not same_run(plain, run_search(cfg(tmp_path / "two", in_flight=2)))


def test_in_flight_resumes_exactly(tmp_path):
    full = run_search(cfg(tmp_path / "full", generations=5))
    run_search(cfg(tmp_path / "split", generations=2))
    saved = json.loads((tmp_path / "split" / "t" / "state.json").read_text())
    assert saved["generation"] == 2 and len(saved["pending"]) == 2
    resumed = run_search(cfg(tmp_path / "split", generations=5), resume=True, evaluator=Scrambled(3))
    assert same_run(full, resumed)


def test_in_flight_children_never_copy_each_other_or_the_population(tmp_path):
    class Recording(ReconstructionEvaluator):
        sent: list[str] = []

        def submit(self, tree):
            self.sent.append(str(tree))
            return super().submit(tree)

    ev = Recording(seed=7)
    state = run_search(cfg(tmp_path / "r", generations=4), evaluator=ev)
    keys = [Simplifier(ev.same_ranking)(Tree.parse(t)).key for t in ev.sent]
    assert len(keys) == len(set(keys))  # every submitted child was new when bred
    # all but the N-1 still out at the end were placed in the cache
    assert sum(1 for r in state.cache.values() if r["generation"] > 0) >= len(ev.sent) - 2


@pytest.mark.parametrize("search, message", [
    ({"batch": 2}, "exclude each other"),
    ({"algorithm": "generational"}, "needs search.algorithm: steady_state"),
    ({"in_flight": 0}, r"within \[1, population"),
    ({"in_flight": 11}, r"within \[1, population"),
])
def test_in_flight_bad_settings_get_one_line(tmp_path, search, message):
    with pytest.raises(UserError, match=message):
        cfg(tmp_path, **search)


def test_in_flight_refuses_multi_fidelity(tmp_path):
    with pytest.raises(UserError, match="multi_fidelity"):
        config_from_dict({"search": {"algorithm": "steady_state", "in_flight": 2},
                          "fitness": {"windows": 4, "multi_fidelity": {"low_windows": 1}}})


def test_resume_does_not_count_pending_children_twice(tmp_path):
    """A pending child that was a formula-cache hit when bred is not counted again when a resume
    sends it back: the counters stay those of the checkpoint until new children are bred."""
    run_search(cfg(tmp_path / "split", generations=1, in_flight=4))
    state_path = tmp_path / "split" / "t" / "state.json"
    saved = json.loads(state_path.read_text())
    saved["pending"][0] = saved["population"][0]  # a child whose fitness is already known
    state_path.write_text(json.dumps(saved))
    state, _ = load_checkpoint(tmp_path / "split" / "t")
    search = GeneticSearch(cfg(tmp_path / "x", in_flight=4).search, ReconstructionEvaluator(seed=7), 7, state)
    search.run(1)  # generation 1 is done: the pending are sent again, then dropped, nothing placed
    assert search.state.counters == saved["counters"]


def test_in_flight_time_budget_stops_at_a_checkpoint_and_resumes_exactly(tmp_path):
    full = run_search(cfg(tmp_path / "full", generations=4))
    split = cfg(tmp_path / "split", generations=4)
    assert run_search(split, max_minutes=1e-9).generation == 0
    stopped = run_search(split, resume=True, max_minutes=1e-9)
    assert stopped.generation == 1 and len(stopped.pending) == 2  # the children in flight wait in the checkpoint
    resumed = run_search(split, resume=True, evaluator=Scrambled(5))
    assert same_run(full, resumed)


def test_a_new_in_flight_run_stopped_past_generation_one_stops_there(tmp_path, monkeypatch):
    """The first call of a run breeds generation 0 in its own loop, then hands over to the in-flight
    loop; stopped there (time budget), it must not go on with one generation of the batch loop."""
    full = run_search(cfg(tmp_path / "full", generations=4))
    split = cfg(tmp_path / "split", generations=4)
    monkeypatch.setattr(GeneticSearch, "out_of_time", lambda self: self.state.generation >= 2)
    assert run_search(split).generation == 2
    monkeypatch.undo()
    assert same_run(full, run_search(split, resume=True))
