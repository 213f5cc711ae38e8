"""The verdict of a search: did it find a metric past the known ones, on its own fitness text and held out?

A few lines a user can act on, printed at the end of ``prunerzero search`` and ``prunerzero report``
and shown at the top of the HTML report. The comparison is on the run's own fitness text, where
every metric was measured alike, and (when the run's held-out step ran) on the first windows of
the held-out texts, beside the baselines there.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from prunerzero.choices import COMPARED
from prunerzero.files import read_json
from prunerzero.search import checkpoint as ckpt
from prunerzero.search.state import SearchState

# A best counts as past a known metric only when lower by more than this fraction: below it, the
# difference is float rounding between two forms of one ranking (mul(X, sqr(W)) ranks as Wanda does,
# up to ties, and scored 45.87069 against Wanda's 45.87113 on the main job's text).
MARGIN = 1e-4


def beats(fitness: float, reference: float) -> bool:
    return fitness < reference * (1 - MARGIN)
HELDOUT_COMPARED = (*COMPARED, "sparsegpt")
EXPORT, REPORT, HELDOUT = "export.json", "report.html", "heldout.json"


def verdict(run_dir: Path, state: SearchState) -> dict[str, Any]:
    """The verdict as data: the best metric, the known metrics on the same fitness text, whether the best
    beat each, the held-out rows when ``RUN/heldout.json`` exists, and where the outputs are."""
    run_dir = Path(run_dir)
    best = state.hall_of_fame(1)
    refs = ckpt.reference_fitness(state.cache)
    out: dict[str, Any] = {"run": str(run_dir), "best": None, "references": {}, "beats": {},
                           "export": str(run_dir / EXPORT), "report": str(run_dir / REPORT), "heldout": None}
    if not best:
        return out
    b = best[0]
    out["best"] = {"formula": b["tree"], "fitness": b["fitness"], "generation": b["generation"]}
    # D exists only inside the OBS update: a run that measured SparseGPT's rule searched inside it, and
    # its Wanda is Wanda with the update; SparseGPT is then the one to beat.
    out["obs"] = "sparsegpt" in refs
    out["lead"] = "sparsegpt" if out["obs"] else "wanda"
    for name in (("sparsegpt",) if out["obs"] else ()) + COMPARED:
        if name in refs:
            r = refs[name]
            out["references"][name] = {"formula": r["tree"], "fitness": r["fitness"], "estimated": r["estimated"]}
            out["beats"][name] = beats(b["fitness"], r["fitness"])
    known = [n for n, r in refs.items() if not beats(b["fitness"], r["fitness"]) and not beats(r["fitness"], b["fitness"])]
    out["best_is_known"] = known[0] if known else None
    path = run_dir / HELDOUT
    if path.is_file():
        out["heldout"] = _heldout_rows(read_json(path, "held-out table"))
    return out


def _heldout_rows(table: Any) -> dict[str, Any] | None:
    """{text: {label: perplexity}} of the best metric (#1) and the baselines, from RUN/heldout.json."""
    if not isinstance(table, dict) or not isinstance(table.get("rows"), list):
        return None
    texts = [t for t in table.get("texts") or [] if isinstance(t, str)]
    out: dict[str, dict[str, float]] = {t: {} for t in texts}
    for row in table["rows"]:
        if not isinstance(row, dict) or not (row.get("label") == "#1" or row.get("label") in HELDOUT_COMPARED):
            continue
        for t in texts:
            v = row.get(t)
            if isinstance(v, (int, float)) and math.isfinite(v):
                out[t]["best" if row["label"] == "#1" else row["label"]] = v
    budget = table.get("budget") or {}
    return {"texts": out, "windows": budget.get("windows"), "seqlen": budget.get("seqlen")}


def _namer(obs: bool):
    """How a known metric is named in a verdict: inside the OBS update, "wanda + obs" (SparseGPT is itself)."""
    return lambda n: n if not obs or n == "sparsegpt" else f"{n} + obs"


LEADS = {"wanda": "Wanda", "sparsegpt": "SparseGPT"}  # how the one to beat is written in a sentence


def _pct(a: float, b: float) -> str:
    return f"{100 * (a - b) / b:+.2f}%"


def format_verdict(v: dict[str, Any], writing: tuple[str, ...] = ()) -> list[str]:
    """The verdict as lines of text (the first line says what happened). ``writing``: outputs
    (``export``, ``report``) the caller is about to write, named although they do not exist yet."""
    run = v["run"]
    b = v["best"]
    if b is None:
        return [f"verdict: {run} has no evaluated metric yet; resume it with prunerzero search --resume {run}"]
    beats, refs = v["beats"], v["references"]
    resume = (f"try prunerzero search --resume {run} --generations N (more generations) or a new run with "
              "another --seed")
    lead = v.get("lead", "wanda")
    name = _namer(v.get("obs", False))
    if lead not in refs:
        head = (f"verdict: Wanda was not measured in this run (search.seed_known_metrics is off), so the run cannot say "
                f"whether its best beat it; compare with prunerzero rescore {run} --baselines wanda")
    elif beats[lead] and v.get("best_is_known"):  # a seeded known metric is the best: nothing was discovered
        passed = [name(n) for n in refs if beats.get(n)]
        head = (f"verdict: the best is a known {'rule' if v.get('obs') else 'metric'}, {name(v['best_is_known'])}, past "
                f"{', '.join(passed)} on its fitness text; nothing bred has beaten it yet; {resume}.")
    elif beats[lead]:
        passed = [name(n) for n in refs if beats.get(n)]
        head = f"verdict: the search found a {'rule' if v.get('obs') else 'metric'} past {', '.join(passed)} on its fitness text."
    else:
        same = (f" (its best scores as {name(v['best_is_known'])} does, within {MARGIN:.2%})" if v.get("best_is_known")
                else "")
        head = f"verdict: no {'rule' if v.get('obs') else 'metric'} beat {LEADS[lead]} in this run{same}; {resume}."
    lines = [head, f"  best: {b['formula']}  fitness {b['fitness']:.4f} (found in generation {b['generation']})"]
    if refs:
        parts = [f"{name(n)} {r['fitness']:.4f}{' (low budget only)' if r['estimated'] else ''} ({_pct(b['fitness'], r['fitness'])})"
                 for n, r in refs.items()]
        lines.append("  on the same fitness text: " + ", ".join(parts))
    h = v.get("heldout")
    if h and any(h["texts"].values()):
        lines.append(f"  held out (first {h['windows']} windows of {h['seqlen']} tokens; perplexity, lower is better):")
        for text, row in h["texts"].items():
            if "best" not in row:
                continue
            others = ", ".join(f"{n} {p:.3f} ({_pct(row['best'], p)})" for n, p in row.items() if n != "best")
            lines.append(f"    {text}: best {row['best']:.3f}; {others}")
    export = v["export"] if "export" in writing or Path(v["export"]).is_file() else f"(not yet: prunerzero export {run})"
    report = v["report"] if "report" in writing or Path(v["report"]).is_file() else f"(not yet: prunerzero report {run})"
    lines.append(f"  exported trees: {export}   HTML report: {report}")
    return lines
