"""What a run's numbers may depend on beyond its config and seed: library versions, CPU, threads.

A search is bitwise reproducible from its config and seed on one machine and software stack (the
tests check it across processes, Python hash seeds and torch thread counts 1 and 2). Across
machines, a different CPU instruction set (the matrix kernels torch picks) or other versions of
torch, transformers or SymPy (whose simplifications decide which trees are distinct) can change
fitnesses in their last digits or the simplified form of a tree, and a search then takes another
path. Each run folder records its environment (``environment.json``) so two runs can be compared,
and a resume on a different one says what differs.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import Any

import torch

PACKAGES = ("torch", "transformers", "sympy", "deap", "numpy", "ray", "safetensors")


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """The software and hardware a run's numbers come from."""
    isa = torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends, "cpu") else None
    return {"python": platform.python_version(), "packages": {p: _version(p) for p in PACKAGES},
            "cpu": _cpu(), "cpu_capability": isa, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What changed between two environments, as 'key: old -> new'."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{d}" for d in differences(a, b)]
        elif a != b and key != "torch_threads":  # thread counts 1 and 2 give equal results (tested)
            out.append(f"{key}: {a} -> {b}")
    return out
