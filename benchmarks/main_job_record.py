"""The record of one run of the main job (``scripts/search-default.sh``), for ``results/main-job/``.

Reads the run folder (log, checkpoint, held-out table) and the script's own output (its log lines
carry clock times) and writes: the wall time of the script, of its set-up and model load, of the
search and of the held-out step; the generation where the best first beat Wanda on the fitness text;
the best against Wanda, RIA and Pruner-Zero there; the held-out rows; and the verdict lines.

    SEED=1 bash scripts/search-default.sh > seed1.log 2>&1   # started at epoch second S, ended at E
    (from the folder holding runs/, so the record names runs/NAME, not a machine path)
    python benchmarks/main_job_record.py runs/smollm2-135m-s1 --output seed1.log --start S --end E \\
        --note "nothing else ran beside it" --out results/main-job/smollm2-135m-s1.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
from pathlib import Path
from typing import Any

from prunerzero.files import write_json
from prunerzero.search import checkpoint as ckpt
from prunerzero.verdict import beats, format_verdict, verdict

CLOCK = re.compile(r"^(\d\d:\d\d:\d\d) INFO (\S+): (.*)$")


def clock_lines(text: str) -> list[tuple[str, str, str]]:
    return [m.groups() for line in text.splitlines() for m in [CLOCK.match(line.split("\r")[-1])] if m]


def seconds_between(day: dt.date, start_epoch: float, clock: str) -> float:
    """Seconds from the script's start to a log line's clock time (same day, UTC)."""
    t = dt.datetime.combine(day, dt.time.fromisoformat(clock), tzinfo=dt.timezone.utc).timestamp()
    return round(t - start_epoch, 1)


def record(run: Path, output: Path, start: float, end: float | None, note: str) -> dict[str, Any]:
    state, _ = ckpt.load_checkpoint(run)
    v = verdict(run, state)
    day = dt.datetime.fromtimestamp(start, dt.timezone.utc).date()
    lines = clock_lines(output.read_text(errors="replace"))
    loaded = next((c for c, who, msg in lines if who == "prunerzero.models" and msg.startswith("loaded")), None)
    gens = [(c, msg) for c, who, msg in lines if who == "prunerzero.search.engine" and msg.startswith("gen ")]
    heldout_end = next((c for c, who, msg in lines if who == "prunerzero.runs" and msg.startswith("held-out perplexity")), None)
    wanda = (v["references"].get("wanda") or {}).get("fitness")
    passed = next((r["generation"] for r in state.log if wanda is not None and r["best"] is not None
                   and beats(r["best"], wanda)), None)
    return {
        "run": run.name, "note": note,
        "wall_seconds": None if end is None else round(end - start, 1),
        "model_loaded_after_s": None if loaded is None else seconds_between(day, start, loaded),
        "generations": [{"generation": int(m.group(1)), "after_s": seconds_between(day, start, c)}
                        for c, msg in gens for m in [re.match(r"gen (\d+):", msg)] if m],
        "heldout_done_after_s": None if heldout_end is None else seconds_between(day, start, heldout_end),
        "generations_completed": state.generation,
        "passed_wanda_at_generation": passed,
        "best": v["best"], "references": v["references"], "beats": v["beats"],
        "heldout": v["heldout"],
        "verdict": format_verdict(v),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--output", type=Path, required=True, help="the script's stdout and stderr")
    ap.add_argument("--start", type=float, required=True, help="epoch seconds when the script started")
    ap.add_argument("--end", type=float, default=None, help="epoch seconds when it ended (none: stopped)")
    ap.add_argument("--command", required=True)
    ap.add_argument("--note", default="")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rec = record(args.run, args.output, args.start, args.end, args.note)
    rec["command"] = args.command
    write_json(args.out, rec)
    print(json.dumps({k: v for k, v in rec.items() if k not in ("generations", "references", "verdict")}, indent=1))
    print("\n".join(rec["verdict"]))


if __name__ == "__main__":
    main()
