"""The genetic-programming loop on DEAP's own tools. It knows nothing of models: it hands trees to an
:class:`~prunerzero.fitness.base.Evaluator` and gets fitnesses back.

Determinism: DEAP draws from the module-level ``random``; each generation seeds it from
``(seed, generation)`` and the caller's RNG state is restored afterwards, so a run does not depend
on anything else in the process, and a run resumed at generation k continues exactly as an
uninterrupted run would.

Two loop styles:
- ``generational``: tournament selection, subtree crossover, subtree/node mutation, elitism from
  the hall of fame.
- ``steady_state`` (the paper's): each step draws two parents among the current top k, breeds one
  child by crossover and mutation, and the child replaces the current worst individual. Children
  are evaluated in batches of ``batch`` (``batch: 1`` is the paper's loop), or, with
  ``in_flight: N``, without any barrier: N children are always out for evaluation and a new one
  is bred as each result comes in (see :meth:`GeneticSearch._run_in_flight` for how this stays
  deterministic and resumable). A generation is then only the unit of checkpointing.
"""

from __future__ import annotations

import logging
import operator
import random
import statistics
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

from deap import base, gp, tools

from prunerzero.config import SearchSection
from prunerzero.config_rules import seed_tree
from prunerzero.errors import UserError
from prunerzero.fitness.base import WORST_FITNESS, Evaluator, FitnessResult
from prunerzero.primitives.deap_set import (
    Individual,
    primitive_set,
    repair_pow,
    to_individual,
    to_tree,
)
from prunerzero.primitives.known import KNOWN_ALLOCATIONS, KNOWN_METRICS
from prunerzero.primitives.registry import constant_name
from prunerzero.primitives.tree import Tree
from prunerzero.search.simplify import Simplifier
from prunerzero.search.state import SearchState, stalled

log = logging.getLogger(__name__)


@dataclass
class _InFlight:
    """A child out for evaluation (``tree`` None: its fitness was known when it was bred)."""

    child: Individual
    key: str
    tree: Tree | None
    result: FitnessResult | None = None


@contextmanager
def _seeded(seed: int | str) -> Iterator[None]:
    saved = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(saved)


class GeneticSearch:
    """Runs generations of a search, updating a :class:`SearchState`."""

    def __init__(self, params: SearchSection, evaluator: Evaluator, seed: int, state: SearchState | None = None,
                 on_generation: Callable[[SearchState], None] | None = None, deadline: float | None = None):
        self.p = params
        self.deadline = deadline  # time.monotonic() after which no generation is begun
        self.stop_reason: str | None = None  # "time" or "stalled" when run() stopped short of its generations
        self.evaluator = evaluator
        self.seed = seed
        self.state = state or SearchState()
        self.on_generation = on_generation
        self.pset = primitive_set(params.operators, params.terminals, params.constants, params.constants_as_leaves)
        self.simplify = Simplifier(evaluator.same_ranking, params.max_height, params.max_size, set(self.pset.mapping))
        tb = base.Toolbox()
        tb.register("expr", gp.genHalfAndHalf, pset=self.pset, min_=params.init_min_depth, max_=params.init_max_depth)
        tb.register("select", tools.selTournament, tournsize=params.tournament_size)
        tb.register("mate", gp.cxOnePoint)
        tb.register("expr_mut", gp.genFull, min_=0, max_=2)
        tb.register("mut_subtree", gp.mutUniform, expr=tb.expr_mut, pset=self.pset)
        tb.register("mut_node", gp.mutNodeReplacement, pset=self.pset)
        for name in ("mate", "mut_subtree", "mut_node"):
            tb.decorate(name, gp.staticLimit(key=operator.attrgetter("height"), max_value=params.max_height))
            tb.decorate(name, gp.staticLimit(key=len, max_value=params.max_size))
            tb.decorate(name, self._repairing)  # after the limits: a repair only shrinks a tree
        self.tb = tb

    def _repairing(self, fn: Callable[..., tuple]) -> Callable[..., tuple]:
        def wrapped(*args: Any, **kw: Any) -> tuple:
            return tuple(repair_pow(ind, self.pset) for ind in fn(*args, **kw))
        return wrapped

    # ------------------------------------------------------------------ evaluation with caches
    def evaluate(self, trees: Sequence[Tree], generation: int) -> list[str]:
        """Simplify, look up, evaluate what is new; returns the canonical key of each tree."""
        keys, todo = [], {}
        for tree in trees:
            key, new = self._lookup(tree, generation, todo)
            keys.append(key)
            if new is not None:
                todo[key] = new
        if todo:
            results = self.evaluator.evaluate(list(todo.values()))
            for (key, tree), res in zip(todo.items(), results):
                self._record(key, tree, res, generation)
        return keys

    def _lookup(self, tree: Tree, generation: int, waiting: Mapping[str, Any]) -> tuple[str, Tree | None]:
        """(canonical key, the simplified tree to evaluate) or (key, None) when its fitness is
        known or on its way (``waiting``): a formula-cache hit, or a constant metric."""
        s = self.simplify(tree)
        if s.key in self.state.cache or s.key in waiting:
            self.state.counters["formula_cache_hits"] += 1
            return s.key, None
        if s.constant:
            self.state.counters["degenerate"] += 1
            self.state.cache[s.key] = {"tree": str(s.tree), "fitness": WORST_FITNESS, "generation": generation,
                                       "reason": "constant metric (no terminal survives simplification)"}
            return s.key, None
        return s.key, s.tree

    def _record(self, key: str, tree: Tree, res: FitnessResult, generation: int) -> None:
        """Put an evaluator's result in the formula cache, counting what it cost."""
        fitness = float(res.fitness)
        if not fitness == fitness or fitness > WORST_FITNESS:  # NaN or beyond the worst: an evaluator bug
            res.reason = res.reason or f"fitness {fitness} is not a finite number"
            fitness = WORST_FITNESS
        record: dict[str, Any] = {"tree": str(tree), "fitness": fitness, "generation": generation}
        if res.reason:
            record["reason"] = res.reason
            self.state.counters["degenerate"] += 1
        if res.mask_key:
            record["mask_key"] = res.mask_key
        if res.low_fitness is not None:
            record["low_fitness"] = float(res.low_fitness)
            if res.cached is None:  # real work: measured on the low budget, and maybe the full one
                self.state.counters["stopped_low" if res.estimated else "promoted"] += 1
        if res.estimated:
            record["estimated"] = True
        if res.cached == "mask":
            record["mask_cache_hit"] = True
            self.state.counters["mask_cache_hits"] += 1
        else:
            self.state.counters["evaluated"] += 1
        self.state.cache[key] = record

    def _simplified(self, ind: Individual) -> Individual:
        s = self.simplify(to_tree(ind))
        if s.changed and all(n in self.pset.mapping for n in s.tree.nodes):
            self.state.counters["simplified"] += 1
            ind = to_individual(s.tree, self.pset)
        return ind

    def _vary(self, a: Individual, b: Individual) -> Individual:
        """One child of two parents: crossover, then mutation, each with its probability."""
        c1, c2 = self.tb.clone(a), self.tb.clone(b)
        if random.random() < self.p.crossover_prob:
            c1, c2 = self.tb.mate(c1, c2)
        if random.random() < self.p.mutation_prob:
            c1, = self._mutate(c1)
        return c1

    def _mutate(self, ind: Individual) -> tuple[Individual]:
        return self.tb.mut_subtree(ind) if random.random() < 0.5 else self.tb.mut_node(ind)

    def _fresh(self, child: Individual, parent_keys: set[str]) -> Individual:
        """OOS, then regenerate a child that is a copy of a parent or of anything evaluated."""
        child = self._simplified(child)
        for _ in range(self.p.regenerate_attempts):
            key = self.simplify(to_tree(child)).key
            if key not in parent_keys and key not in self.state.cache:
                break
            self.state.counters["regenerated"] += 1
            child = self._simplified(self._mutate(self.tb.clone(child))[0])
        self.state.counters["generated"] += 1
        return child

    # ------------------------------------------------------------------ generations
    def _initial(self) -> list[Individual]:
        pop: list[Individual] = []
        constants = {constant_name(c) for c in self.p.constants}
        if self.p.seed_known_metrics:
            for metric in (*KNOWN_METRICS.values(), *KNOWN_ALLOCATIONS.values()):
                tree = metric.tree
                if (tree.terminals <= set(self.p.terminals) and tree.operators <= set(self.p.operators)
                        and tree.constants <= constants):
                    pop.append(to_individual(tree, self.pset))
        seen = {self.simplify(to_tree(i)).key for i in pop}
        for i, spec in enumerate(self.p.seed_trees):  # checked against the space when the config was read
            tree = seed_tree(spec, self.p.space)
            key = self.simplify(tree).key
            if key in seen:
                log.info("search.seed_trees[%d] %s is already in generation 0 (as the same ranking)", i, tree)
                continue
            try:
                pop.append(to_individual(tree, self.pset))
            except Exception as e:  # e.g. a constant outside pow when constants_as_leaves is false
                raise UserError(f"search.seed_trees[{i}] {tree} cannot be built from this search's primitives "
                                f"({e}); check search.constants_as_leaves") from None
            seen.add(key)
        if len(pop) > self.p.population:
            raise UserError(f"generation 0 would hold {len(pop)} known metrics and seed trees, more than "
                            f"search.population ({self.p.population}); raise it, drop seeds or set "
                            "seed_known_metrics: false")
        attempts = 0
        while len(pop) < self.p.population:
            ind = self._simplified(repair_pow(Individual(self.tb.expr()), self.pset))
            key = self.simplify(to_tree(ind)).key
            attempts += 1
            if key in seen and attempts < 50 * self.p.population:
                continue  # diversity: distinct metrics first, duplicates only if the space is tiny
            seen.add(key)
            self.state.counters["generated"] += 1
            pop.append(ind)
        return pop

    def _generational(self, pop: list[Individual]) -> list[Individual]:
        elites = [to_individual(Tree.parse(r["tree"]), self.pset) for r in self.state.hall_of_fame(self.p.elites)]
        self._assign(pop)
        offspring = [self.tb.clone(i) for i in self.tb.select(pop, len(pop) - len(elites))]
        out = []
        for i in range(0, len(offspring), 2):
            pair = offspring[i:i + 2]
            if len(pair) == 2 and random.random() < self.p.crossover_prob:
                pair = list(self.tb.mate(*pair))
                for c in pair:
                    c.varied = True
            out.extend(pair)
        parent_keys = {self.simplify(to_tree(i)).key for i in pop}
        children, new = [], []
        for child in out:
            if random.random() < self.p.mutation_prob:
                child = self._mutate(child)[0]
                child.varied = True
            if getattr(child, "varied", False):
                child = self._fresh(child, parent_keys)
                new.append(child)
            children.append(child)
        self.evaluate([to_tree(c) for c in new], self.state.generation + 1)
        return elites + children

    def _steady_state(self, pop: list[Individual]) -> list[Individual]:
        """``steps_per_generation`` children, bred and evaluated in batches of ``batch``: each batch
        draws its parents from the current top k, and each child replaces the current worst
        before the next batch is bred. ``batch: 1`` is the paper's loop, one child at a time;
        larger batches keep several workers (or a multi-fidelity rung) busy. A generation is only
        the unit of checkpointing here."""
        batch = self.p.batch or self.p.steps_per_generation
        done = 0
        while done < self.p.steps_per_generation:
            self._assign(pop)
            # a child may copy neither a member of the population nor a sibling of its batch
            taken = {self.simplify(to_tree(i)).key for i in pop}
            children = [self._breed(pop, taken) for _ in range(min(batch, self.p.steps_per_generation - done))]
            self.evaluate([to_tree(c) for c in children], self.state.generation + 1)
            self._assign(children)
            for child in children:
                self._place(pop, child)
            done += len(children)
        return pop

    def _breed(self, pop: list[Individual], taken: set[str]) -> Individual:
        """One child of two parents drawn from the current top k (fitnesses assigned); its key
        joins ``taken``, the keys it must not copy."""
        ranked = sorted(pop, key=lambda i: (i.fitness.values[0], len(i), str(i)))
        a, b = random.sample(ranked[: self.p.top_k], 2)
        child = self._fresh(self._vary(a, b), taken)
        taken.add(self.simplify(to_tree(child)).key)
        return child

    def _place(self, pop: list[Individual], child: Individual) -> None:
        """Put a scored child into the population in place of the worst member. With
        ``distinct_masks``, a child that prunes exactly as a member does (same mask hash, hence the
        same fitness) is a twin: it takes that member's place only if it is the smaller tree, and
        displaces nobody else. Without this, formula-distinct copies of the best metric (``mul(X,
        sqr(W))`` for Wanda's ``mul(W, sqrt(X))``) fill the top k, and breeding only recombines them."""
        if self.p.distinct_masks:
            mask = self._mask_key(child)
            twin = next((j for j, m in enumerate(pop) if mask is not None and self._mask_key(m) == mask), None)
            if twin is not None:
                self.state.counters["mask_twins"] += 1
                if (len(child), str(child)) < (len(pop[twin]), str(pop[twin])):
                    pop[twin] = child
                return
        self._replace_worst(pop, child)

    def _mask_key(self, ind: Individual) -> str | None:
        return self.state.cache[self.simplify(to_tree(ind)).key].get("mask_key")

    @staticmethod
    def _replace_worst(pop: list[Individual], child: Individual) -> None:
        pop.append(child)
        worst = max(range(len(pop)), key=lambda j: (pop[j].fitness.values[0], len(pop[j]), str(pop[j]), j))
        pop.pop(worst)

    def _run_in_flight(self, generations: int) -> None:
        """The steady state without a generation barrier (``search.in_flight`` = N): N children
        are always out for evaluation, and a new child is bred as soon as the oldest one's result
        is in, from the population that result leaves. A worker that finishes early takes the
        next queued child at once (keep N above the worker count so one is always queued).

        Results are taken in breeding order, never in finishing order: child i is bred from the
        population after children 0..i-N replaced the worst, whatever the timing, so a run
        depends on its seed and N only (not on worker count or speed), and the children in
        flight at a checkpoint (``SearchState.pending``) are sent again on resume, exactly as
        an uninterrupted run goes on. At the end of a call those N-1 evaluations are dropped.
        Each child's breeding draws from its own seeded stream."""
        steps, n = self.p.steps_per_generation, self.p.in_flight
        pop = [to_individual(Tree.parse(f), self.pset) for f in self.state.population]
        self._assign(pop)
        flight: deque[_InFlight] = deque()  # oldest first
        by_ticket: dict[int, _InFlight] = {}

        def launch(child: Individual) -> None:
            waiting = {f.key for f in flight if f.tree is not None}
            key, tree = self._lookup(to_tree(child), self.state.generation + 1, dict.fromkeys(waiting))
            entry = _InFlight(child, key, tree)
            if tree is not None:
                by_ticket[self.evaluator.submit(tree)] = entry
            flight.append(entry)

        counted = dict(self.state.counters)  # the pending were counted when they were bred
        for formula in self.state.pending:  # bred before the checkpoint: their turn comes first
            launch(to_individual(Tree.parse(formula), self.pset))
        self.state.counters.update(counted)
        done = self.state.generation * steps  # children that have replaced the worst
        bred = done + len(flight)
        start, before = time.perf_counter(), dict(self.state.counters)
        shown = start
        try:
            while done < generations * steps:
                while bred < done + n:
                    taken = {self.simplify(to_tree(i)).key for i in pop} | {f.key for f in flight}
                    with _seeded(f"{self.seed}:child:{bred}"):
                        launch(self._breed(pop, taken))
                    bred += 1
                head = flight.popleft()
                while head.tree is not None and head.result is None:
                    for ticket, result in self.evaluator.wait_any().items():
                        by_ticket.pop(ticket).result = result
                if head.tree is not None:
                    self._record(head.key, head.tree, head.result, self.state.generation + 1)
                head.child.fitness.values = (self.state.cache[head.key]["fitness"],)
                self._place(pop, head.child)
                done += 1
                if time.perf_counter() - shown > 30 and done % steps:
                    shown = time.perf_counter()
                    log.info("gen %d: %d/%d children placed (%.2f cand/min)", self.state.generation + 1, done % steps,
                             steps, 60 * (done % steps) / max(shown - start, 1e-9))
                if done % steps == 0:
                    self.state.population = [str(to_tree(i)) for i in pop]
                    self.state.pending = [str(to_tree(f.child)) for f in flight]
                    self.state.generation += 1
                    self._log(self.state.generation, before, time.perf_counter() - start)
                    if self.on_generation:
                        self.on_generation(self.state)
                    if done < generations * steps and self.should_stop():
                        break  # the children in flight are in state.pending: a resume sends them again
                    start, before = time.perf_counter(), dict(self.state.counters)
        finally:
            self.evaluator.drop_submitted()  # those still out are in state.pending: sent again on resume

    def should_stop(self) -> bool:
        """Stop at this checkpoint: the time budget is spent, or the best stopped improving; sets
        :attr:`stop_reason`."""
        if stalled(self.state.log, self.p.patience, self.p.min_improvement):
            self.stop_reason = "stalled"
        elif self.out_of_time():
            self.stop_reason = "time"
        return self.stop_reason is not None

    def out_of_time(self) -> bool:
        """Past the deadline: stop at this generation's checkpoint (``--max-minutes``); a resume goes
        on exactly as an uninterrupted run would."""
        return self.deadline is not None and time.monotonic() >= self.deadline

    def _assign(self, pop: Sequence[Individual]) -> None:
        for ind in pop:
            ind.fitness.values = (self.state.cache[self.simplify(to_tree(ind)).key]["fitness"],)

    def run(self, generations: int) -> SearchState:
        """Run until ``generations`` generations after the initial one are complete."""
        if self.state.generation < generations and stalled(self.state.log, self.p.patience, self.p.min_improvement):
            self.stop_reason = "stalled"  # a resumed run that had already stopped improving: nothing to do
            return self.state
        if self.p.in_flight and self.state.generation >= 0:
            self._run_in_flight(generations)
            return self.state
        while self.state.generation < generations:
            gen = self.state.generation + 1
            start = time.perf_counter()
            before = dict(self.state.counters)
            with _seeded(self.seed * 1_000_003 + gen):
                if gen == 0:
                    pop = self._initial()
                    self.evaluate([to_tree(i) for i in pop], gen)
                else:
                    pop = [to_individual(Tree.parse(f), self.pset) for f in self.state.population]
                    pop = self._generational(pop) if self.p.algorithm == "generational" else self._steady_state(pop)
            self.state.population = [str(to_tree(i)) for i in pop]
            self.state.generation = gen
            self._log(gen, before, time.perf_counter() - start)
            if self.on_generation:
                self.on_generation(self.state)
            if self.state.generation < generations and self.should_stop():
                break
            if self.p.in_flight:  # after the initial population: no generation barrier
                self._run_in_flight(generations)  # to the end, or to the checkpoint where it stopped
                break
        return self.state

    def _log(self, gen: int, before: dict[str, int], seconds: float) -> None:
        fits = [self.state.fitness_of(f) for f in self.state.population]
        finite = [f for f in fits if f < WORST_FITNESS]
        best = self.state.hall_of_fame(1)
        c = self.state.counters
        row = {
            "generation": gen,
            "best": best[0]["fitness"] if best else None,
            "best_tree": best[0]["tree"] if best else None,
            "population_best": min(finite) if finite else None,
            "median": statistics.median(finite) if finite else None,
            "unique_in_population": len({self.simplify(Tree.parse(f)).key for f in self.state.population}),
            "unique_evaluated": len(self.state.cache),
            **{f"{k}_this_gen": c[k] - before.get(k, 0) for k in c},
            **{f"{k}_total": v for k, v in c.items()},
        }
        self.state.log.append(row)
        fmt = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
        log.info("gen %d: best %s median %s | unique evaluated %d, evaluated %d, cache hits %d formula + %d mask, "
                 "%.1f s (%.2f cand/min) | %s", gen, fmt(row["best"]), fmt(row["median"]), row["unique_evaluated"],
                 row["evaluated_this_gen"], row["formula_cache_hits_this_gen"], row["mask_cache_hits_this_gen"],
                 seconds, 60 * row["evaluated_this_gen"] / max(seconds, 1e-9), row["best_tree"])
        self.last_seconds = seconds
