"""The Ray side of the actor pool: settings, the actor class, and the small checks the pool makes
(cluster reachable, resources free, a worker ready). :mod:`prunerzero.fitness.ray_pool` drives them."""

from __future__ import annotations

import logging
import os
import resource
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from ray.exceptions import RayError

from prunerzero.errors import UserError
from prunerzero.fitness.base import FitnessResult
from prunerzero.fitness.model_fitness import (
    FitnessSettings,
    ModelFitness,
    statistics_paths,
)
from prunerzero.primitives.tree import Tree

log = logging.getLogger(__name__)


CONNECT_TIMEOUT_S = 5.0  # TCP check of a cluster address before ray.init, which can hang
KILL_GRACE_S = 2.0  # past timeout_s + this, an actor that has not answered is stuck


@dataclass(frozen=True)
class RaySettings:
    """How the actor pool is laid out.

    ``address``: ``None`` starts a local Ray instance (stopped again by :meth:`RayEvaluator.close`;
    if this process already has a Ray session, that one is used and left running); ``"auto"`` or
    ``"host:port"`` joins a running cluster. ``timeout_s`` bounds one tree; ``startup_timeout_s``
    bounds one worker's start (process, model, statistics, fitness tokens). ``max_restarts`` is
    how often a tree is re-run on a fresh worker after the worker died under it.
    """

    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    threads_per_worker: int = 1
    address: str | None = None
    timeout_s: float = 600.0
    max_restarts: int = 3
    startup_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise UserError(f"workers must be at least 1, not {self.workers}")
        if self.cpus_per_worker < 0 or self.gpus_per_worker < 0:
            raise UserError("cpus_per_worker and gpus_per_worker must not be negative")
        if self.threads_per_worker < 1:
            raise UserError(f"threads_per_worker must be at least 1, not {self.threads_per_worker}")
        if self.timeout_s <= 0 or self.startup_timeout_s <= 0:
            raise UserError("timeout_s and startup_timeout_s must be positive")
        if self.max_restarts < 0:
            raise UserError(f"max_restarts must not be negative, not {self.max_restarts}")


def statistics_ready(settings: FitnessSettings, run_dir: str | Path, gradients: bool = True) -> bool:
    """Whether X (and G, if the run reads it) are in the run folder."""
    acts, grads = statistics_paths(settings, run_dir)
    return acts.is_file() and (not gradients or grads.is_file())


def one_line(e: BaseException | str, limit: int = 400) -> str:
    """A short description of an error: Ray errors carry whole tracebacks; keep the cause."""
    if isinstance(e, BaseException):
        cause = getattr(e, "cause", None)
        if isinstance(cause, BaseException):
            e = cause
        text = str(e).strip()
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        name = type(e).__name__
        text = f"{name}: {lines[0]}" if lines else name
    else:
        text = e.strip().splitlines()[0] if e.strip() else "unknown error"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class FitnessWorker:
    """The body of one Ray actor: a :class:`ModelFitness` built once, then one tree at a time.

    Construction never raises: a failure is kept and reported by :meth:`ready`, so the driver
    gets one clean line instead of an actor-death traceback.
    """

    def __init__(self, settings: FitnessSettings, run_dir: str, threads: int, gradients: bool = True):
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(threads)
        torch.set_num_threads(threads)
        self.fitness: ModelFitness | None = None
        self.error: str | None = None
        try:
            self.fitness = ModelFitness(settings, run_dir, gradients=gradients)
        except Exception as e:  # reported by ready()
            self.error = one_line(e)
            log.error("worker could not start: %s", self.error)

    def ready(self) -> str | None:
        """None when the worker can evaluate, else why it cannot."""
        return self.error

    def evaluate(self, text: str, budget: int | None = None) -> FitnessResult:
        start = time.perf_counter()
        try:
            return self.fitness.evaluate(Tree.parse(text), budget)
        except UserError:
            raise
        except Exception as e:  # a tree must never stop the search
            log.warning("tree %s failed: %s", text, e)
            return FitnessResult.worst(one_line(e), time.perf_counter() - start)

    def remember(self, mask_fitness: dict[str, float]) -> None:
        if self.fitness is not None:
            self.fitness.known_masks.update(mask_fitness)

    def peak_rss_mb(self) -> float:
        """Peak resident memory of this worker process (Linux reports ru_maxrss in KiB)."""
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def memory_mb(self) -> dict[str, float]:
        """Peak RSS, and now: RSS, PSS (shared pages split between the processes that map them: the
        model and statistics files are mapped, so workers of one machine share them) and private
        memory (what this worker alone holds). PSS and private need Linux's smaps_rollup."""
        out = {"peak_rss": self.peak_rss_mb()}
        try:
            fields = dict(line.split(":", 1) for line in open("/proc/self/smaps_rollup").read().splitlines()[1:])
        except OSError:
            return out
        kib = {k.strip(): int(v.split()[0]) for k, v in fields.items()}
        out.update(rss=kib["Rss"] / 1024, pss=kib["Pss"] / 1024,
                   private=(kib["Private_Clean"] + kib["Private_Dirty"]) / 1024)
        return out

    def pid(self) -> int:
        return os.getpid()


_REMOTE_WORKER: Any = None


def remote_worker() -> Any:
    """FitnessWorker as a Ray actor class, made once per process (each ray.remote re-exports it)."""
    global _REMOTE_WORKER
    if _REMOTE_WORKER is None:
        _REMOTE_WORKER = ray.remote(FitnessWorker)
    return _REMOTE_WORKER


def free_resources() -> str:
    free = ray.available_resources()
    return f"{free.get('CPU', 0):g} CPU, {free.get('GPU', 0):g} GPU"


def device_available(device: str) -> bool:
    if device.startswith("cuda"):
        return torch.cuda.is_available()
    return True


def check_reachable(address: str) -> None:
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"Ray address must be 'auto' or host:port, not {address!r}")
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as e:
        raise UserError(f"cannot reach the Ray cluster at {address} ({e.strerror or e}); start it with "
                        "`ray start --head` there, or leave address unset for a local instance") from None


def ready_error(ref: Any) -> str | None:
    """None if the worker behind a ready() reference can evaluate, else why not."""
    try:
        return ray.get(ref)
    except RayError as e:  # the process died while loading (for instance killed for memory)
        return one_line(e)


def kill(handle: Any) -> None:
    try:
        ray.kill(handle, no_restart=True)
    except Exception:  # already dead or the session is gone
        pass
