"""Did a run written before fitness windows were kept apart from calibration windows score on text it
calibrated on? (``docs/decisions.md``: the ``discover-50`` question.)

Before commit 1b3df32 the fitness text was the first ``windows * seqlen`` tokens of the validation
split joined with "\\n\\n", while calibration windows are random windows of the same split joined with
" ". The two tokenisations differ, so the check is on the text: the rows (lines of the split) each
window covers, found by decoding the windows and matching rows of at least 40 characters.

    python benchmarks/fitness_overlap.py --nsamples 8 --calib-seqlen 1024 --seqlen 512 --windows 8 \
        --out results/fitness-overlap-discover-50.json
"""

from __future__ import annotations

import argparse
import json
import logging

from prunerzero.data import calibration_windows, joined_tokens, text_rows
from prunerzero.files import write_json
from prunerzero.models import load_model


def covered_rows(text: str, rows: list[tuple[int, str]]) -> set[int]:
    return {i for i, r in rows if r in text}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--calib-seqlen", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    _, tokenizer, _ = load_model(args.model, "cpu")
    rows = [(i, r.strip()) for i, r in enumerate(text_rows("wikitext2", "validation")) if len(r.strip()) >= 40]
    old_fitness = joined_tokens(tokenizer, "wikitext2", "validation", "\n\n", None)[: args.windows * args.seqlen]
    fitness_rows = covered_rows(tokenizer.decode(old_fitness), rows)
    calib = calibration_windows(tokenizer, "wikitext2", args.nsamples, args.calib_seqlen, args.seed, "validation")
    calib_rows = [covered_rows(tokenizer.decode(w), rows) for w in calib]
    per_window = [sorted(r & fitness_rows) for r in calib_rows]
    result = {
        "what": "rows of WikiText-2 validation shared by the pre-1b3df32 fitness text and the calibration windows",
        "command": "python benchmarks/fitness_overlap.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out", "model")),
        "fitness_rows": len(fitness_rows), "fitness_tokens": int(old_fitness.numel()),
        "calibration_windows": args.nsamples,
        "rows_per_calibration_window": [len(r) for r in calib_rows],  # the matching finds rows at all
        "first_fitness_row": min(fitness_rows), "last_fitness_row": max(fitness_rows),
        "calibration_rows_span": [[min(r), max(r)] if r else None for r in calib_rows],
        "shared_rows_per_window": [len(w) for w in per_window],
        "windows_overlapping": sum(1 for w in per_window if w),
        "overlap": any(per_window),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
