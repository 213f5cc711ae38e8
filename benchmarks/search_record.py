"""The small JSON record of a finished search, for ``results/searches/``: what the README quotes.

Reads a run folder (``state.json``, ``log.jsonl``, ``hall_of_fame.json`` and, for an allocation
search, ``allocation.json``) and writes the counters, the best per generation, the top 10 and,
for an allocation search, OWL's and uniform's fitness on the same text. No weights, no statistics.

With ``--keep-checkpoint DIR`` it also copies the files a resume needs (``state.json``,
``config.yaml``, ``log.jsonl``, ``hall_of_fame.json``, ``environment.json``: JSON and YAML, no
statistics) to ``DIR/RUN/``, so a search split across sessions survives the machine it ran on:
``cp -r DIR/RUN runs/ && prunerzero search --resume runs/RUN``. The statistics (X, G) are
recomputed on the resume, from the same calibration windows.

    python benchmarks/search_record.py runs/allocation-70-sequential \\
        --command "prunerzero search --config configs/allocation-70-sequential.yaml" \\
        --wall-seconds 3300 --out results/searches/allocation-70-sequential.json
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from prunerzero.files import write_json
from prunerzero.runfolder import run_config
from prunerzero.runs import ENVIRONMENT
from prunerzero.search import checkpoint as ckpt
from prunerzero.search.checkpoint import reference_fitness

# the checkpoint's own file names: what a resume reads, nothing it recomputes
RESUME_FILES = (ckpt.STATE, ckpt.CONFIG, ckpt.LOG, ckpt.HALL_OF_FAME, ENVIRONMENT)
PER_GENERATION_KEYS = ("generation", "best", "best_tree", "median", "unique_evaluated", "evaluated_this_gen")


def record(run: Path, command: str, wall_seconds: float | None, code: str | None = None) -> dict[str, Any]:
    cfg = run_config(run)
    state = json.loads((run / "state.json").read_text())
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    hall = json.loads((run / "hall_of_fame.json").read_text())["trees"]
    commit = code or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    out: dict[str, Any] = {
        "run": run.name, "command": command, "code": f"commit {commit}" if commit else "unknown", "seed": cfg.seed,
        "space": cfg.search.space, "sparsity": cfg.fitness.sparsity, "pattern": cfg.fitness.pattern,
        "stats_mode": cfg.fitness.stats_mode,
        "fitness_text": f"{cfg.fitness.windows} x {cfg.fitness.seqlen} {cfg.fitness.text} {cfg.fitness.split}",
        "calibration": f"{cfg.calibration.nsamples} x {cfg.calibration.seqlen} {cfg.calibration.source} "
                       f"{cfg.calibration.split} (seed {cfg.calibration.seed})",
        "seed_known_metrics": cfg.search.seed_known_metrics, "seed_trees": cfg.search.seed_trees,
        "generations_completed": state["generation"], "counters": state["counters"],
        "wall_seconds": wall_seconds,
        "per_generation": [{k: row[k] for k in PER_GENERATION_KEYS if k in row} for row in log],
        "top10": [{"tree": r["formula"], "fitness": r["fitness"], "generation": r["generation"]} for r in hall[:10]],
    }
    if cfg.search.space == "allocation":
        allocation = json.loads((run / "allocation.json").read_text())
        out["metric"] = allocation["metric"]
        out["reference_fitness"] = allocation["reference"]
        out["best"] = {"function": allocation["function"], "fitness": allocation["fitness"]}
    else:
        out["best"] = {"tree": hall[0]["formula"], "fitness": hall[0]["fitness"]}
        out["reference_fitness"] = reference_fitness(state["cache"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="the search's run folder")
    p.add_argument("--command", required=True, help="the command that made the run, as a reader would re-run it")
    p.add_argument("--wall-seconds", type=float, default=None, help="the run's wall time, if measured")
    p.add_argument("--code", default=None, help="the commit the run was made with (default: this checkout's HEAD)")
    p.add_argument("--out", required=True, help="the JSON record to write")
    p.add_argument("--keep-checkpoint", type=Path, default=None, metavar="DIR",
                   help="also copy the files a resume needs to DIR/RUN/ (e.g. results/runs)")
    args = p.parse_args()
    write_json(args.out, record(args.run, args.command, args.wall_seconds, args.code))
    if args.keep_checkpoint:
        keep_checkpoint(args.run, args.keep_checkpoint / args.run.name)


def keep_checkpoint(run: Path, dest: Path) -> None:
    """Copy the run's resumable checkpoint (no statistics, no plots) to ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in RESUME_FILES:
        if (run / name).is_file():
            shutil.copy2(run / name, dest / name)
    config = dest / ckpt.CONFIG
    if config.is_file():  # no path of this machine in the repository: a resume takes the folder it is given
        text = config.read_text()
        config.write_text(re.sub(r"(?m)^output_dir: .*$", "output_dir: runs", text))


if __name__ == "__main__":
    main()
