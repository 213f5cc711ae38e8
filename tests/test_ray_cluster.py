"""A real Ray cluster on this machine: a head started with ``ray start --head`` and a second node
process joined with ``ray start --address``, with token authentication (Ray's default for new
clusters). A search runs against it as a user runs it (``prunerzero search`` with
``evaluator.address``, in its own process); one worker process is killed with SIGKILL in the
middle of the search; its candidate is re-run and nothing is lost. The cluster is stopped at the end."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.test_ray_pool import smollm2_tokenizer, tiny_model  # noqa: F401  (fixtures)

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_pids() -> list[int]:
    """Processes of the pool's actors (Ray names them ray::FitnessWorker)."""
    import psutil  # installed with ray[default]

    pids = []
    for proc in psutil.process_iter(["pid", "cmdline", "name"]):
        text = " ".join(proc.info.get("cmdline") or []) + " " + (proc.info.get("name") or "")
        if "ray::FitnessWorker" in text:
            pids.append(proc.info["pid"])
    return pids


@pytest.fixture
def cluster():
    """(address, environment): head + one more node, both real raylets; stopped afterwards."""
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "RAY_USAGE_STATS_ENABLED": "0"}
    port = free_port()
    temp = Path(tempfile.gettempdir()) / f"rayc{os.getpid()}"  # Ray's socket paths must stay short
    address = f"127.0.0.1:{port}"
    try:
        for args in (["--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp}"],
                     [f"--address={address}"]):
            subprocess.run([RAY, "start", *args, "--node-ip-address=127.0.0.1", "--num-cpus=1",
                            "--disable-usage-stats"], check=True, env=env, capture_output=True, timeout=180)
        yield address, env
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.integration
def test_search_on_a_two_node_cluster_survives_a_killed_worker(cluster, tiny_model, tmp_path):  # noqa: F811
    address, env = cluster
    config = {
        "name": "c", "output_dir": str(tmp_path), "seed": 0,
        "model": {"name": str(tiny_model), "device": "cpu"},
        "calibration": {"nsamples": 2, "seqlen": 64},
        "fitness": {"seqlen": 64, "windows": 2},
        "search": {"population": 8, "generations": 3, "init_max_depth": 2},
        "evaluator": {"type": "ray", "address": address, "workers": 2, "cpus_per_worker": 1, "timeout_s": 120},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    search = subprocess.Popen([sys.executable, "-m", "prunerzero.cli", "search", "--config", str(tmp_path / "c.yaml")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "c" / "log.jsonl"
    deadline = time.time() + 300
    while not log.is_file() and search.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    pids = worker_pids()
    if len(pids) != 2:
        search.kill()
        pytest.fail(f"workers {pids}; search output: {search.communicate()[0][-3000:]}")
    os.kill(pids[0], signal.SIGKILL)  # generation 1 is being bred or evaluated: a worker dies under it
    out, _ = search.communicate(timeout=600)
    assert search.returncode == 0, out[-3000:]
    state = json.loads((tmp_path / "c" / "state.json").read_text())
    assert state["generation"] == 3
    assert not [r for r in state["cache"].values() if "died" in r.get("reason", "")]
    assert "replacing it" in out or "replacement" in out, out[-3000:]
