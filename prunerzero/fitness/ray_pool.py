"""Fitness on a pool of Ray actors, each holding one model and its statistics for the whole run.

The driver prepares the statistics once (cached in the run folder), then starts ``workers``
actors; each loads the model, the statistics and the fitness tokens once and then evaluates
formula strings one after another (a :class:`~prunerzero.fitness.model_fitness.ModelFitness` per
actor, so fitnesses equal those of the in-process evaluator). Trees are queued (``submit``, or a
whole batch with ``evaluate``) and a free actor takes the next one; ``wait_any`` returns results
as they finish, ``evaluate`` returns a batch's in input order.

Faults never stop the search:

- a tree that raises gets the worst fitness with the exception as reason;
- a tree that takes longer than ``timeout_s`` gets the worst fitness, reason
  ``"timeout after N s"``; an actor that has not answered ``timeout_s`` (plus a short grace for
  the answer in transit) after the tree was sent is stuck: it is killed and replaced;
- an actor that dies (crash, OOM kill, lost node) is replaced and its tree re-run, at most
  ``max_restarts`` times per tree, then the tree gets the worst fitness.

Configuration problems fail fast with :class:`~prunerzero.errors.UserError` before any tree is
evaluated: an unreachable cluster, more CPUs or GPUs per worker than the cluster has, a model a
worker cannot load.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import ray
import torch
from ray.exceptions import RayActorError, RayError, RayTaskError

from prunerzero.errors import UserError
from prunerzero.fitness.base import Evaluator, FitnessResult, mask_cache_key
from prunerzero.fitness.model_fitness import (
    FitnessSettings,
    prepare_statistics,
    statistics_paths,
)
from prunerzero.fitness.obs_fitness import run_obs_factors
from prunerzero.fitness.ray_worker import (
    KILL_GRACE_S,
    RaySettings,
    check_reachable,
    device_available,
    free_resources,
    kill,
    one_line,
    ready_error,
    remote_worker,
    statistics_ready,
)
from prunerzero.models import load_model
from prunerzero.primitives.tree import Tree

log = logging.getLogger(__name__)


@dataclass
class _Slot:
    """One place in the pool: the current actor and whether it is starting or busy."""

    handle: Any
    started: float  # monotonic time the actor was created
    ready_ref: Any = None  # pending result of ready() while the actor starts
    job: Any = None  # ObjectRef of the tree it evaluates, if any


@dataclass
class _Job:
    slot: _Slot
    index: int
    sent: float  # monotonic time the tree was sent


class RayEvaluator(Evaluator):
    """Evaluates trees on a pool of long-lived Ray actors (see the module docstring)."""

    def __init__(self, settings: FitnessSettings, run_dir: str | Path, ray_settings: RaySettings | None = None,
                 gradients: bool = True):
        """``gradients=False``: no tree of the run reads G, so neither the driver nor a worker computes it."""
        self.settings = settings
        self.gradients = gradients
        self.full_budget = settings.windows
        self.pattern = settings.pattern
        self.mask_group = settings.mask_group
        self.run_dir = Path(run_dir)
        self.ray_settings = ray_settings or RaySettings()
        self._slots: list[_Slot] = []
        self._running: dict[Any, _Job] = {}  # ObjectRef -> the job it answers
        self._jobs: dict[int, tuple[str, int | None]] = {}  # ticket -> (formula, budget), until collected
        self._queue: deque[int] = deque()  # tickets not yet sent to a worker
        self._results: dict[int, FitnessResult] = {}  # finished, not yet collected
        self._deaths: dict[int, int] = {}  # ticket -> workers that died under it
        self._next_ticket = 0
        self._known: dict[str, float] = {}
        self._owns_ray = False
        self._closed = False
        self._start_failures = 0  # consecutive replacement workers that failed to start
        self.replaced = 0  # workers replaced after death, timeout or a failed start
        self.deaths = 0  # workers that died under a tree
        self.timeouts = 0  # trees that ran past timeout_s

        if settings.device.startswith("cuda") and self.ray_settings.gpus_per_worker <= 0:
            raise UserError(f"device {settings.device!r} needs gpus_per_worker > 0 (Ray hides GPUs from workers "
                            "without one)")
        statistics_paths(settings, self.run_dir)  # fails fast on a missing model path
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._connect()
            self._check_resources()
            if not statistics_ready(settings, self.run_dir, gradients) and device_available(settings.device):
                self._prepare_statistics()
            # Without the statistics (the driver cannot use the device), the first worker computes
            # them into the run folder and the others start once it is ready and load them.
            first = self.ray_settings.workers if statistics_ready(settings, self.run_dir, gradients) else 1
            self._start_workers(first)
            if first < self.ray_settings.workers:
                self._start_workers(self.ray_settings.workers - first)
        except BaseException:
            self.close()
            raise
        rs = self.ray_settings
        log.info("Ray pool of %d worker(s) ready (%g CPU, %g GPU, %d thread(s) each)", rs.workers,
                 rs.cpus_per_worker, rs.gpus_per_worker, rs.threads_per_worker)

    # ------------------------------------------------------------------ setup
    def _connect(self) -> None:
        address = self.ray_settings.address
        if address not in (None, "auto"):
            check_reachable(address)
        if ray.is_initialized():
            log.info("using the Ray session already open in this process")
            return
        try:
            if address is None:
                needed = math.ceil(self.ray_settings.workers * self.ray_settings.cpus_per_worker)
                ray.init(num_cpus=max(os.cpu_count() or 1, needed), include_dashboard=False,
                         logging_level=logging.WARNING)
            else:
                ray.init(address=address, logging_level=logging.WARNING)
        except (ConnectionError, TimeoutError) as e:
            raise UserError(f"cannot connect to the Ray cluster at {address!r}: {one_line(e)}") from None
        self._owns_ray = True

    def _check_resources(self) -> None:
        res, workers = ray.cluster_resources(), self.ray_settings.workers
        for kind, per in (("CPU", self.ray_settings.cpus_per_worker), ("GPU", self.ray_settings.gpus_per_worker)):
            have = res.get(kind, 0.0)
            if per > have:
                raise UserError(f"each worker asks for {per:g} {kind}(s) but the Ray cluster has {have:g}; "
                                f"lower {kind.lower()}s_per_worker")
            if per * workers > have + 1e-9:
                fit = int(have // per)
                raise UserError(f"{workers} workers x {per:g} {kind}(s) need {per * workers:g} but "
                                f"the Ray cluster has {have:g}; use workers={fit} or fewer {kind}s per worker")

    def _prepare_statistics(self) -> None:
        log.info("computing the statistics once in the driver")
        model, tokenizer, source = load_model(self.settings.model, self.settings.device)
        try:
            prepare_statistics(model, tokenizer, source, self.settings, self.run_dir, self.gradients)
            run_obs_factors(model, tokenizer, source, self.settings, self.run_dir)
        finally:
            del model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if not statistics_ready(self.settings, self.run_dir, self.gradients):  # then every worker computes them: slow
            log.warning("statistics are not where expected: %s", ", ".join(map(str, statistics_paths(
                self.settings, self.run_dir))))

    def _new_actor(self) -> _Slot:
        threads = str(self.ray_settings.threads_per_worker)
        cls = remote_worker().options(
            num_cpus=self.ray_settings.cpus_per_worker, num_gpus=self.ray_settings.gpus_per_worker, max_restarts=0,
            runtime_env={"env_vars": {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}},
        )
        handle = cls.remote(self.settings, str(self.run_dir), self.ray_settings.threads_per_worker, self.gradients)
        slot = _Slot(handle, time.monotonic())
        slot.ready_ref = handle.ready.remote()
        if self._known:
            handle.remember.remote(dict(self._known))
        return slot

    def _start_workers(self, n: int) -> None:
        """Start n workers and wait until all can evaluate; the first failure is a UserError."""
        new = [self._new_actor() for _ in range(n)]
        self._slots += new
        deadline = time.monotonic() + self.ray_settings.startup_timeout_s
        pending = {s.ready_ref: s for s in new}
        warned = False
        while pending:
            wait = max(0.0, deadline - time.monotonic())
            done, _ = ray.wait(list(pending), num_returns=1, timeout=wait if warned else min(wait, 30.0))
            if not done and not warned and time.monotonic() < deadline:
                warned = True
                log.warning("%d Ray worker(s) still starting after 30 s (each needs %g CPU, %g GPU; the cluster has "
                            "%s available)", len(pending), self.ray_settings.cpus_per_worker,
                            self.ray_settings.gpus_per_worker,
                            free_resources())
                continue
            if not done:
                raise UserError(f"{len(pending)} Ray worker(s) did not start within "
                                f"{self.ray_settings.startup_timeout_s:g} s; "
                                "are the requested CPUs/GPUs free in the cluster?")
            for ref in done:
                slot = pending.pop(ref)
                slot.ready_ref = None
                error = ready_error(ref)
                if error:
                    raise UserError(f"a Ray worker could not load model {self.settings.model!r}: {error}")

    # ------------------------------------------------------------------ interface
    @property
    def actors(self) -> list[Any]:
        """The current actor handles, one per worker (for tests and diagnostics)."""
        return [s.handle for s in self._slots]

    def remember(self, mask_fitness: dict[str, float]) -> None:
        """Seed every worker's mask cache (and those of future replacements)."""
        self._known.update(mask_fitness)
        for slot in self._slots:  # actor calls run in order, so this lands before later trees
            slot.handle.remember.remote(dict(mask_fitness))

    def submit(self, tree: Tree, budget: int | None = None) -> int:
        """Queue a tree; the next free worker takes it. Returns its ticket for :meth:`wait_any`."""
        if self._closed:
            raise UserError("this Ray evaluator is closed")
        ticket, self._next_ticket = self._next_ticket, self._next_ticket + 1
        self._jobs[ticket] = (str(tree), budget)
        self._queue.append(ticket)
        return ticket

    def wait_any(self) -> dict[int, FitnessResult]:
        """Results of submitted trees (ticket -> result) as soon as at least one is in; workers
        that become free meanwhile take the next queued trees."""
        if not self._jobs:
            raise RuntimeError("wait_any() with no tree submitted")
        try:
            while not self._results:
                self._dispatch()
                self._step()
        except BaseException:  # KeyboardInterrupt included: leave no worker running, re-raise
            self.close()
            raise
        out, self._results = self._results, {}
        for ticket in out:
            del self._jobs[ticket]
            self._deaths.pop(ticket, None)
        self._share({mask_cache_key(r.mask_key, r.budget): r.fitness for r in out.values()
                     if r.mask_key and r.reason is None and not r.cached})
        return out

    def drop_submitted(self) -> None:
        """Forget the trees not collected: queued ones are never sent, and the answers of those
        being evaluated are ignored when they come (their workers then take new trees)."""
        self._queue.clear()
        self._jobs.clear()
        self._results.clear()
        self._deaths.clear()

    def evaluate(self, trees: Sequence[Tree], budget: int | None = None) -> list[FitnessResult]:
        """A batch, spread over the workers; results in input order."""
        if self._jobs:
            raise RuntimeError("evaluate() while trees submitted with submit() are outstanding")
        texts = [str(t) for t in trees]
        tickets: dict[str, int] = {}
        for tree, text in zip(trees, texts):
            if text not in tickets:
                tickets[text] = self.submit(tree, budget)
        results: dict[int, FitnessResult] = {}
        while len(results) < len(tickets):
            results.update(self.wait_any())
        out, seen = [], set()
        for text in texts:
            r = results[tickets[text]]
            if text in seen:  # a repeated formula: the same masks, as the in-process cache would say
                r = FitnessResult(r.fitness, reason=r.reason, mask_key=r.mask_key,
                                  cached="mask" if r.mask_key else None, budget=r.budget)
            seen.add(text)
            out.append(r)
        return out

    def close(self) -> None:
        """Kill the workers and end the Ray session this evaluator opened (if it opened one)."""
        if self._closed:
            return
        self._closed = True
        if ray.is_initialized():
            for slot in self._slots:
                kill(slot.handle)
        self._slots.clear()
        self._running.clear()
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
        self._owns_ray = False

    # ------------------------------------------------------------------ scheduling
    def _dispatch(self) -> None:
        now = time.monotonic()
        for slot in self._slots:
            if not self._queue:
                return
            if slot.ready_ref is None and slot.job is None:
                index = self._queue.popleft()
                ref = slot.handle.evaluate.remote(*self._jobs[index])
                slot.job = ref
                self._running[ref] = _Job(slot, index, now)

    def _step(self) -> None:
        """Wait for one answer (a tree or a starting worker) or the next deadline, and handle it."""
        starting = {s.ready_ref: s for s in self._slots if s.ready_ref is not None}
        refs = list(self._running) + list(starting)
        if not refs:
            raise RuntimeError("Ray pool has trees to evaluate but no worker")  # cannot happen
        timeout = self.ray_settings.timeout_s
        limit = timeout + KILL_GRACE_S
        deadlines = [j.sent + limit for j in self._running.values()]
        deadlines += [s.started + self.ray_settings.startup_timeout_s for s in starting.values()]
        wait = max(0.0, min(deadlines) - time.monotonic())
        done, _ = ray.wait(refs, num_returns=1, timeout=wait)
        for ref in done:
            if ref in self._running:
                self._finish(ref)
            else:
                self._started(starting[ref])
        now = time.monotonic()
        for ref, job in list(self._running.items()):
            if now - job.sent > limit:  # stuck: its actor can serve no more trees
                del self._running[ref]
                self.timeouts += 1
                log.warning("tree %d timed out after %g s; replacing its worker", job.index, timeout)
                if job.index in self._jobs:
                    self._results[job.index] = FitnessResult.worst(f"timeout after {timeout:g} s", now - job.sent)
                self._replace(job.slot)
        for slot in list(starting.values()):
            if slot.ready_ref is not None and now - slot.started > self.ray_settings.startup_timeout_s:
                self._failed_start(slot, f"did not start within {self.ray_settings.startup_timeout_s:g} s")

    def _finish(self, ref: Any) -> None:
        job = self._running.pop(ref)
        results, deaths = self._results, self._deaths
        job.slot.job = None
        if job.index not in self._jobs:  # dropped: the answer is not wanted; a dead worker is replaced
            try:
                ray.get(ref)
            except (RayActorError, RayError):
                self._replace(job.slot)
            return
        try:
            result = ray.get(ref)
        except UserError as e:  # as the in-process evaluator: a configuration problem stops the run
            raise UserError(one_line(e).removeprefix("UserError: ")) from None
        except RayTaskError as e:  # the worker catches tree errors itself; this is unexpected
            results[job.index] = FitnessResult.worst(one_line(e))
            return
        except (RayActorError, RayError) as e:  # the worker died (crash, OOM, node lost, killed)
            deaths[job.index] = deaths.get(job.index, 0) + 1
            self.deaths += 1
            why = one_line(e)
            log.warning("worker died under tree %d (%s); replacing it", job.index, why)
            if deaths[job.index] > self.ray_settings.max_restarts:
                reason = f"worker died {deaths[job.index]} times under this tree: {why}"
                results[job.index] = FitnessResult.worst(reason)
            else:
                self._queue.appendleft(job.index)
            self._replace(job.slot)
            return
        if result.reason is None and result.seconds > self.ray_settings.timeout_s:
            self.timeouts += 1
            result = FitnessResult.worst(f"timeout after {self.ray_settings.timeout_s:g} s", result.seconds)
        results[job.index] = result

    def _started(self, slot: _Slot) -> None:
        ref, slot.ready_ref = slot.ready_ref, None
        error = ready_error(ref)
        if error:
            self._failed_start(slot, error)
        else:
            self._start_failures = 0

    def _failed_start(self, slot: _Slot, error: str) -> None:
        self._start_failures += 1
        if self._start_failures > self.ray_settings.max_restarts:
            raise UserError(f"Ray workers keep failing to start ({self._start_failures} in a row): {error}")
        log.warning("replacement worker failed to start (%s); trying again", error)
        self._replace(slot)

    def _replace(self, slot: _Slot) -> None:
        """Kill the slot's actor (if still alive) and put a fresh one in its place."""
        kill(slot.handle)
        if slot.job is not None:
            self._running.pop(slot.job, None)
        fresh = self._new_actor()
        slot.handle, slot.started, slot.ready_ref, slot.job = fresh.handle, fresh.started, fresh.ready_ref, None
        self.replaced += 1

    def _share(self, new: dict[str, float]) -> None:
        """Tell every worker the masks learnt in this batch, so no worker re-runs another's masks."""
        new = {k: v for k, v in new.items() if k not in self._known}
        if new:
            self.remember(new)
