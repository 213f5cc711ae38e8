"""A search is reproducible from its config and seed: across processes and Python hash seeds, and
its run folder records the environment its numbers came from."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

from prunerzero.config import config_from_dict
from prunerzero.primitives.registry import EXTENDED_OPERATORS
from prunerzero.runs import run_search

SCRIPT = """
import json, sys
from prunerzero.config import config_from_dict
from prunerzero.runs import run_search
cfg = config_from_dict(json.loads(sys.argv[1]))
state = run_search(cfg)
print(json.dumps({"counters": state.counters, "population": state.population, "log": state.log}))
"""


def config(root) -> dict:
    return {"name": "r", "output_dir": str(root), "seed": 11, "search": {
        "algorithm": "steady_state", "population": 12, "generations": 4, "top_k": 5, "steps_per_generation": 6,
        "in_flight": 3, "operators": list(EXTENDED_OPERATORS), "constants": [0.25, 0.5, 2],
        "seed_known_metrics": False}, "evaluator": {"type": "reconstruction"}}


def test_same_search_in_processes_with_different_hash_seeds(tmp_path):
    """Set and dict orders of strings change with PYTHONHASHSEED: nothing the search decides may
    depend on them (SymPy's simplifications included)."""
    runs = []
    for seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(config(tmp_path / seed))], env=env,
                             capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert runs[0] == runs[1]
    assert runs[0]["counters"]["simplified"] > 0  # OOS did work in both


def test_run_folder_records_its_environment_and_a_resume_elsewhere_says_so(tmp_path, caplog):
    cfg = config_from_dict({**config(tmp_path), "search": {**config(tmp_path)["search"], "generations": 1}})
    run_search(cfg)
    path = tmp_path / "r" / "environment.json"
    env = json.loads(path.read_text())
    assert env["packages"]["torch"] and env["packages"]["sympy"] and env["cpu"]
    env["packages"]["sympy"] = "0.0.1"
    path.write_text(json.dumps(env))
    with caplog.at_level(logging.WARNING):
        run_search(config_from_dict({**config(tmp_path), "search": {**config(tmp_path)["search"], "generations": 2}}),
                   resume=True)
    assert "packages.sympy: 0.0.1 ->" in caplog.text
    assert json.loads(path.read_text())["packages"]["sympy"] == "0.0.1"  # the record of the start is kept
