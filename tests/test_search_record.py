"""benchmarks/search_record.py: the record of a search, and the checkpoint it keeps so that a search
split across sessions survives the machine it ran on."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from prunerzero.cli import main
from prunerzero.search import checkpoint as ckpt

ROOT = Path(__file__).resolve().parent.parent
RECON = {"seed": 3, "search": {"population": 8}, "evaluator": {"type": "reconstruction"}}


def search(tmp_path: Path, name: str, generations: int) -> Path:
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump({"name": name, "output_dir": str(tmp_path / "runs"),
                                   **{**RECON, "search": {**RECON["search"], "generations": generations}}}))
    assert main(["search", "--config", str(cfg), "--no-heldout"]) == 0
    return tmp_path / "runs" / name


def test_the_kept_checkpoint_alone_resumes_the_search_exactly_elsewhere(tmp_path):
    full = search(tmp_path, "full", 4)
    half = search(tmp_path, "half", 2)
    out = tmp_path / "record.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "search_record.py"), str(half),
                           "--command", "prunerzero search --config half.yaml", "--out", str(out),
                           "--keep-checkpoint", str(tmp_path / "kept")], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    record = json.loads(out.read_text())
    assert record["generations_completed"] == 2 and record["best"]["tree"] == record["top10"][0]["tree"]
    kept = tmp_path / "kept" / "half"
    # JSON and YAML only: no statistics, no plots, no lock
    assert sorted(p.name for p in kept.iterdir()) == sorted(
        n for n in ("state.json", "config.yaml", "log.jsonl", "hall_of_fame.json", "environment.json")
        if (half / n).exists())
    # the machine is gone: only the kept files are left, in another folder
    shutil.rmtree(tmp_path / "runs" / "half")
    moved = tmp_path / "elsewhere" / "half"
    shutil.copytree(kept, moved)
    assert main(["search", "--resume", str(moved), "--generations", "4", "--no-heldout"]) == 0
    assert (moved / ckpt.LOG).read_text() == (full / ckpt.LOG).read_text()
    resumed, _ = ckpt.load_checkpoint(moved)
    uninterrupted, _ = ckpt.load_checkpoint(full)
    assert resumed.population == uninterrupted.population


def test_git_does_not_ignore_a_kept_checkpoint():
    # results/runs/ is committed; a "runs/" pattern once hid it from git without a word
    kept = [f"results/runs/discover-x/{name}" for name in (ckpt.STATE, ckpt.CONFIG, ckpt.LOG, ckpt.HALL_OF_FAME)]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *kept], cwd=ROOT, capture_output=True, text=True)
    assert ignored.returncode == 1 and not ignored.stdout, f"ignored by .gitignore: {ignored.stdout}"
    runs = subprocess.run(["git", "check-ignore", "--no-index", "runs/discover-x/state.json"], cwd=ROOT)
    assert runs.returncode == 0  # a run folder itself (statistics, plots) stays out of git
