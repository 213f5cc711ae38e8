"""The Ray actor pool on a real local Ray instance and a tiny random LLaMA with the SmolLM2 tokenizer.

Ray is started once for the module (by the pool fixture, through RaySettings' local start); the
other evaluators join that session. Faults are made with real Ray calls: ``ray.kill`` on an actor,
and ``__ray_call__`` to keep an actor busy or to make its evaluation raise.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import ray
import torch

from prunerzero.config import SearchSection
from prunerzero.errors import UserError
from prunerzero.fitness.base import WORST_FITNESS
from prunerzero.fitness.model_fitness import (
    FitnessSettings,
    InProcessEvaluator,
    mask_key,
    prepare_statistics,
)
from prunerzero.fitness.ray_pool import RayEvaluator, RaySettings, statistics_ready
from prunerzero.models import SMOLLM2, cache_dir, load_model, resolve_model
from prunerzero.primitives.tree import Tree
from prunerzero.pruning.calibration import Calibration
from prunerzero.search.engine import GeneticSearch

KNOWN = ["abs(W)", "mul(abs(W), sqrt(X))", "mul(abs(mul(W, W)), mms(G))", "sqrt(G)"]


def trees(*texts: str) -> list[Tree]:
    return [Tree.parse(t) for t in texts]


def _tokenizer_folder() -> Path | None:
    found = sorted(p for p in (cache_dir() / "models").glob("SmolLM2*") if (p / "tokenizer_config.json").is_file())
    return found[0] if found else None


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    if _tokenizer_folder() is None:
        try:
            load_model(SMOLLM2)  # converts the GGUF file once and caches it
        except UserError as e:
            pytest.fail(f"SmolLM2 tokenizer unavailable: {e}")
    return AutoTokenizer.from_pretrained(_tokenizer_folder())


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, smollm2_tokenizer) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, intermediate_size=64, max_position_embeddings=128)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    return folder


def fitness_settings(model: Path | str) -> FitnessSettings:
    return FitnessSettings(model=str(model), calibration=Calibration(nsamples=2, seqlen=64), seqlen=64, windows=2)


@pytest.fixture(scope="module")
def settings(tiny_model) -> FitnessSettings:
    return fitness_settings(tiny_model)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("run")


@pytest.fixture(scope="module")
def pool(settings, run_dir):
    """Two workers on a local Ray instance that the evaluator starts itself (and stops on close)."""
    assert not ray.is_initialized()
    assert not statistics_ready(settings, run_dir)
    ev = RayEvaluator(settings, run_dir, RaySettings(workers=2, timeout_s=120))
    assert ray.is_initialized() and len(ev.actors) == 2
    assert statistics_ready(settings, run_dir)  # prepared once, by the driver
    yield ev
    ev.close()
    assert not ray.is_initialized(), "close() must stop the Ray instance it started"


@pytest.fixture(scope="module")
def reference(pool, settings, run_dir):
    """The in-process evaluator on the same run folder; one thread, as each Ray worker has."""
    return InProcessEvaluator(settings, run_dir)


def in_process(reference, texts) -> list[float]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [r.fitness for r in reference.evaluate(trees(*texts))]
    finally:
        torch.set_num_threads(threads)


def fresh(ev: RayEvaluator, **changes) -> None:
    ev.ray_settings = dataclasses.replace(ev.ray_settings, **changes)


def ids(handles) -> set:
    return {h._actor_id for h in handles}


# ---------------------------------------------------------------------------- fast, no Ray start
def test_fitness_tokens_from_a_text_prefix_equal_those_of_the_whole_text(smollm2_tokenizer):
    from prunerzero.data import joined_tokens

    whole = joined_tokens(smollm2_tokenizer, "wikitext2", "validation", "\n\n")
    for need in (1024, 4096):
        assert torch.equal(joined_tokens(smollm2_tokenizer, "wikitext2", "validation", "\n\n", None, need), whole[:need])


def test_settings_are_checked():
    with pytest.raises(UserError, match="workers"):
        RaySettings(workers=0)
    with pytest.raises(UserError, match="timeout"):
        RaySettings(timeout_s=0)


def test_unreachable_address_fails_fast(settings, run_dir):
    start = time.monotonic()
    with pytest.raises(UserError, match="cannot reach the Ray cluster at 127.0.0.1:1"):
        RayEvaluator(settings, run_dir, RaySettings(address="127.0.0.1:1"))
    assert time.monotonic() - start < 15


def test_missing_model_path_fails_before_ray(run_dir, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        RayEvaluator(fitness_settings(tmp_path / "nowhere"), run_dir, RaySettings())


def test_cuda_device_without_gpus_per_worker(settings, run_dir):
    with pytest.raises(UserError, match="gpus_per_worker"):
        RayEvaluator(dataclasses.replace(settings, device="cuda"), run_dir, RaySettings())


# ---------------------------------------------------------------------------- in-process
def test_weights_are_bitwise_restored(reference):
    model = reference.fitness.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = reference.fitness.evaluate(Tree.parse("mul(abs(W), sqr(G))"))
    assert result.reason is None and result.cached is None and result.fitness < WORST_FITNESS
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------------------- the pool
def test_ray_fitness_equals_in_process(pool, reference):
    got = pool.evaluate(trees(*KNOWN, KNOWN[0]))
    assert [r.fitness for r in got[:4]] == in_process(reference, KNOWN)
    assert all(r.reason is None and r.mask_key for r in got)
    assert got[4].fitness == got[0].fitness and got[4].cached == "mask"  # a repeat in the batch
    assert len({r.mask_key for r in got[:4]}) == 4
    # A later batch finds these masks in every worker's cache, whichever worker computed them.
    again = pool.evaluate(trees(*KNOWN))
    assert [r.cached for r in again] == ["mask"] * 4
    assert [r.fitness for r in again] == [r.fitness for r in got[:4]]
    # A low budget is measured, not served from the full-budget cache, and agrees with in-process.
    low = pool.evaluate(trees(*KNOWN), budget=1)
    assert [r.cached for r in low] == [None] * 4 and all(r.budget == 1 for r in low)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert [r.fitness for r in low] == [r.fitness for r in reference.evaluate(trees(*KNOWN), budget=1)]
    finally:
        torch.set_num_threads(threads)


def test_submitted_trees_come_back_as_they_finish(pool, reference):
    texts = ["mul(abs(W), X)", "add(abs(W), G)", "mul(W, G)", "abs(mul(W, sqrt(X)))", "sqrt(X)"]
    tickets = {pool.submit(t): str(t) for t in trees(*texts)}
    got = {}
    while len(got) < len(tickets):
        batch = pool.wait_any()
        assert batch and not set(batch) & set(got)
        got.update(batch)
    assert set(got) == set(tickets)
    by_text = {tickets[k]: r.fitness for k, r in got.items()}
    assert [by_text[t] for t in texts] == in_process(reference, texts)
    with pytest.raises(RuntimeError, match="no tree submitted"):
        pool.wait_any()


def test_search_without_barrier_on_the_pool_equals_in_process(pool, reference):
    """search.in_flight on two workers: the same run as one process evaluating in order."""
    params = SearchSection(algorithm="steady_state", population=6, generations=2, top_k=3, steps_per_generation=4,
                           in_flight=3, max_height=5, max_size=12)
    on_pool = GeneticSearch(params, pool, seed=1).run(2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = GeneticSearch(params, reference, seed=1).run(2)
    finally:
        torch.set_num_threads(threads)
    assert on_pool.population == local.population and on_pool.pending == local.pending
    assert {k: r["fitness"] for k, r in on_pool.cache.items()} == {k: r["fitness"] for k, r in local.cache.items()}
    assert len(on_pool.pending) == 2


def test_remember_seeds_the_workers(pool, reference):
    tree = Tree.parse("mul(sqrt(W), X)")
    key = mask_key(reference.fitness.masks(tree))
    pool.remember({key: 123.0})
    (r,) = pool.evaluate([tree])
    assert (r.fitness, r.cached, r.mask_key) == (123.0, "mask", key)


def test_killed_worker_is_replaced_and_its_tree_rerun(pool, reference):
    texts = ["mul(abs(W), X)", "add(abs(W), G)", "mul(W, G)", "abs(mul(W, sqrt(X)))"]
    victim = pool.actors[0]
    # Keep the victim busy, so the tree it is sent is in flight (queued behind this) when it dies.
    victim.__ray_call__.remote(lambda self: time.sleep(60))
    replaced = pool.replaced
    with ThreadPoolExecutor(1) as ex:
        future = ex.submit(pool.evaluate, trees(*texts))
        time.sleep(1.0)
        ray.kill(victim, no_restart=True)
        got = future.result(timeout=150)
    assert all(r.reason is None for r in got), [r.reason for r in got]
    assert [r.fitness for r in got] == in_process(reference, texts)
    assert pool.replaced == replaced + 1 and pool.deaths >= 1
    assert victim._actor_id not in ids(pool.actors) and len(pool.actors) == 2


def test_tree_that_raises_gets_worst_fitness(pool, reference):
    def poison(self):
        original = self.fitness.evaluate

        def evaluate(tree, budget=None):
            if str(tree) == "sub(W, G)":
                raise RuntimeError("boom")
            return original(tree, budget)

        self.fitness.evaluate = evaluate

    def cure(self):
        del self.fitness.evaluate

    ray.get([a.__ray_call__.remote(poison) for a in pool.actors])
    try:
        bad, good = pool.evaluate(trees("sub(W, G)", "mul(abs(W), abs(G))"))
    finally:
        ray.get([a.__ray_call__.remote(cure) for a in pool.actors])
    assert bad.fitness == WORST_FITNESS and bad.reason == "RuntimeError: boom"
    assert good.fitness == in_process(reference, ["mul(abs(W), abs(G))"])[0]


def test_tree_slower_than_timeout_gets_worst_fitness(pool):
    fresh(pool, timeout_s=0.001)  # every real evaluation takes longer; the worker stays healthy
    try:
        got = pool.evaluate(trees("mul(W, X)", "add(W, X)"))
    finally:
        fresh(pool, timeout_s=120)
    assert [r.fitness for r in got] == [WORST_FITNESS] * 2
    assert all(r.reason == "timeout after 0.001 s" for r in got)
    assert len(pool.actors) == 2


def test_stuck_worker_is_killed_and_replaced(pool, reference):
    victim = pool.actors[0]
    victim.__ray_call__.remote(lambda self: time.sleep(120))  # stuck: the tree sent to it cannot start
    fresh(pool, timeout_s=3)
    try:
        start = time.monotonic()
        (r,) = pool.evaluate(trees("mul(sqrt(W), G)"))
        took = time.monotonic() - start
    finally:
        fresh(pool, timeout_s=120)
    assert r.fitness == WORST_FITNESS and r.reason == "timeout after 3 s"
    assert took < 30
    assert victim._actor_id not in ids(pool.actors)
    # The pool still works, with the replacement.
    texts = ["mul(sqrt(W), G)", "add(abs(W), sqrt(X))"]
    assert [x.fitness for x in pool.evaluate(trees(*texts))] == in_process(reference, texts)


def test_more_gpus_than_the_cluster_has(pool, settings, run_dir):
    with pytest.raises(UserError, match="GPU"):
        RayEvaluator(settings, run_dir, RaySettings(gpus_per_worker=1))
    assert ray.is_initialized()  # the pool's session is left alone


def test_a_pool_whose_trees_never_read_g_never_computes_it(pool, reference, settings, tmp_path):
    run_dir = tmp_path / "no-g"
    # No CPU asked: the pool's two workers hold both CPUs of this Ray instance.
    ev = RayEvaluator(settings, run_dir, RaySettings(workers=1, cpus_per_worker=0, timeout_s=120), gradients=False)
    try:
        texts = ["abs(W)", "mul(abs(W), sqrt(X))"]
        assert [r.fitness for r in ev.evaluate(trees(*texts))] == in_process(reference, texts)
        assert [p.name.split("-")[0] for p in run_dir.glob("*.safetensors")] == ["activations"]
    finally:
        ev.close()  # its workers only: the Ray session is the pool's
    assert ray.is_initialized()


def test_worker_that_cannot_load_the_model(pool, tiny_model, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    settings = fitness_settings(broken)
    run_dir = tmp_path / "run"
    prepare_statistics(*load_model(str(broken)), settings, run_dir)  # the driver will not load it
    fingerprint = resolve_model(str(broken)).fingerprint
    with open(broken / "model.safetensors", "r+b") as f:  # in place: the folder's stat is unchanged
        f.write(b"\xff" * 64)
    assert resolve_model(str(broken)).fingerprint == fingerprint and statistics_ready(settings, run_dir)
    start = time.monotonic()
    with pytest.raises(UserError, match="a Ray worker could not load model") as err:
        # No CPU asked: the pool's two workers hold both CPUs of this Ray instance.
        RayEvaluator(settings, run_dir, RaySettings(workers=1, cpus_per_worker=0, startup_timeout_s=400))
    assert "\n" not in str(err.value)
    assert time.monotonic() - start < 400  # ~20 s on an idle machine; generous for a loaded one
    assert ray.is_initialized()
