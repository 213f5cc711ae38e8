"""Ship a search's best metric as ``prunerzero/trees/NAME.json`` (then ``--tree NAME`` loads it).

The file holds the tree (Pruner-Zero JSON format), its formula and fitness, how it was found
(config, seed, generation, commit, pattern, sparsity, fitness text, the search's record) and the
fitness of the known metrics on the same text, so a reader sees what it beat when it was chosen.
Choosing uses validation text only: the test split is not read here.

    python benchmarks/ship_metric.py runs/discover-2of4 --name NAME --config configs/discover-2of4.yaml \\
        --record results/searches/discover-2of4.json --description "what it is, in words"

With ``--rescore RUN/rescore/KEY.json`` (``prunerzero rescore RUN``), the tree shipped is the one with
the lowest re-scored perplexity (or ``--rank``), the re-score goes into the file, and a tree that does
not beat Wanda on the re-score is refused unless ``--even-if-it-loses``.
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
from pathlib import Path
from typing import Any

from prunerzero.config_rules import check_run_name
from prunerzero.errors import UserError
from prunerzero.evaluation.rescore import best_rescored, paired_change
from prunerzero.files import read_json, write_json
from prunerzero.primitives.known import KNOWN_METRICS, SHIPPED_TREES
from prunerzero.runfolder import run_config
from prunerzero.search import checkpoint as ckpt


def shipped_metric(run: Path, name: str, description: str, config: str, record: str | None,
                   rank: int | None = None, code: str | None = None, rescore: Path | None = None,
                   even_if_it_loses: bool = False) -> dict[str, Any]:
    cfg = run_config(run)
    if cfg.search.space != "metric":
        raise UserError(f"{run} is an allocation search; ship its allocation file, not a metric")
    if rank is not None and rank < 1:
        raise UserError(f"--rank must be 1 or more, got {rank}")
    state, _ = ckpt.load_checkpoint(run)
    rescored = read_json(rescore, "re-score record") if rescore is not None else None
    if rescored is not None and rescored.get("run") != cfg.name:
        raise UserError(f"{rescore} is the re-score of run {rescored.get('run')!r}, not of {cfg.name!r}")
    if rank is None:
        picked = best_rescored(rescored, skip=known_keys()) if rescored is not None else None
        if rescored is not None and picked is None:
            raise UserError(f"{rescore} has no re-scored tree yet that is not a known metric; finish prunerzero "
                            f"rescore {run} first (or --top N for more of its trees)")
        rank = picked[1]["rank"] if picked else 1
    trees = ckpt.export_trees(state, rank)["trees"]
    if len(trees) < rank:
        raise UserError(f"{run} has {len(trees)} evaluated metrics, fewer than rank {rank}")
    best = trees[rank - 1]
    f = cfg.fitness
    reference = "sparsegpt" if f.update == "obs" else "wanda"  # what a rule inside the update must beat
    validation = (_rescore_block(rescored, best["formula"], rescore, even_if_it_loses, reference)
                  if rescored else None)
    commit = code or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    # a rule found inside the weight update is pruned with it: prune --tree NAME reads these keys
    update = {"update": f.update, "obs_scope": f.obs_scope} if f.update != "none" else {}
    return {
        "name": name,
        "description": description,
        **update,
        "found_by": {"config": config, "seed": cfg.seed, "generation": best["generation"],
                     "code": f"commit {commit}" if commit else "unknown", "pattern": f.pattern,
                     "sparsity": f.sparsity,
                     # a rule searched with a layerwise allocation was ranked under it
                     **({"allocation": dataclasses.asdict(f.allocation)} if f.allocation is not None else {}),
                     "calibration": f"{cfg.calibration.source} {cfg.calibration.split}, "
                                    f"{cfg.calibration.nsamples} x {cfg.calibration.seqlen} tokens",
                     "fitness_text": f"{f.text} {f.split}, {f.windows} x {f.seqlen} tokens",
                     "record": record, **update},
        "reference_fitness": {k: v for k, v in ckpt.reference_fitness(state.cache).items() if k != name},
        **({"validation_rescore": validation} if validation else {}),
        "trees": [{**best, "rank": 1}],
    }


NAMES = {"wanda": "Wanda", "sparsegpt": "SparseGPT"}


def known_keys() -> set[str]:
    """The known metrics' symbolic keys: a re-score picks the best *bred* tree, not a seeded one."""
    return {m.tree.symbolic_key() for m in KNOWN_METRICS.values()}


def _rescore_block(record: dict[str, Any], formula: str, path: Path, even_if_it_loses: bool,
                   reference: str = "wanda") -> dict[str, Any]:
    """The chosen tree's re-score beside the baselines'; a tree that loses to ``reference`` there
    (Wanda; SparseGPT for a rule inside the weight update) is refused."""
    mine = record["trees"].get(formula)
    if mine is None or mine["perplexity"] is None:
        raise UserError(f"{path} has no re-scored perplexity for {formula}; re-score it (prunerzero rescore --top N)")
    baselines = {v["name"]: v["perplexity"] for v in record["baselines"].values()}
    theirs = baselines.get(reference)
    if theirs is None:
        raise UserError(f"{path} has no re-score of {reference}; re-score with --baselines {reference},...")
    if mine["perplexity"] >= theirs and not even_if_it_loses:
        raise UserError(f"{formula} does not beat {NAMES[reference]} on the re-score ({mine['perplexity']:.3f} against "
                        f"{theirs:.3f}); ship nothing, or pass --even-if-it-loses")
    ref_entry = next(v for v in record["baselines"].values() if v["name"] == reference)
    paired = paired_change(mine.get("window_losses") or (), ref_entry.get("window_losses") or ())
    # the gap to the reference with the spread of the windows behind it (records that keep them)
    versus = {f"paired_vs_{reference}": {"change": paired[0], "standard_error": paired[1]}} if paired else {}
    return {"perplexity": mine["perplexity"], "baselines": baselines, "record": str(path), **versus,
            **{k: record[k] for k in ("text", "windows", "seqlen", "stats_mode", "calibration")}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="the search's run folder")
    p.add_argument("--name", required=True, help="a name that says what the metric is (the file stem)")
    p.add_argument("--description", required=True, help="the formula in words, and why it differs from the known ones")
    p.add_argument("--config", required=True, help="the config the run was started from, as a reader would re-run it")
    p.add_argument("--record", default=None, help="the search's record under results/searches/")
    p.add_argument("--rank", type=int, default=None, help="ship the hall of fame's entry of this rank (default: the best "
                                                         "re-scored with --rescore, else the best fitness)")
    p.add_argument("--rescore", type=Path, default=None, help="a re-score record (prunerzero rescore RUN): choose by it")
    p.add_argument("--even-if-it-loses", action="store_true", help="ship a tree that does not beat Wanda on the re-score")
    p.add_argument("--code", default=None, help="the commit the run was made with (default: this checkout's HEAD)")
    p.add_argument("--out-dir", type=Path, default=SHIPPED_TREES)
    p.add_argument("--force", action="store_true", help="replace a shipped metric of the same name")
    args = p.parse_args()
    try:
        check_run_name(args.name, "--name")
        if args.name in KNOWN_METRICS:
            raise UserError(f"--name {args.name} is a known metric's name; choose another")
        out = args.out_dir / f"{args.name}.json"
        if out.exists() and not args.force:
            raise UserError(f"{out} exists; pass --force to replace it")
        data = shipped_metric(args.run, args.name, args.description, args.config, args.record, args.rank, args.code,
                              args.rescore, args.even_if_it_loses)
    except UserError as err:
        p.error(str(err))
    write_json(out, data)
    best = data["trees"][0]
    print(f"wrote {out}: {best['formula']} (fitness {best['fitness']:.4f}); "
          f"load with --tree {args.name}" + ("" if args.out_dir == SHIPPED_TREES else f" once in {SHIPPED_TREES}"))
    for ref, r in data["reference_fitness"].items():
        print(f"  {ref:28s} {r['fitness']:.4f}{' (estimated)' if r['estimated'] else ''}")
    if "validation_rescore" in data:
        v = data["validation_rescore"]
        print(f"re-score ({v['windows']} x {v['seqlen']} unused validation tokens): {v['perplexity']:.3f}; "
              + ", ".join(f"{k} {b:.3f}" for k, b in v["baselines"].items() if b is not None))
        for key, gap in v.items():
            if key.startswith("paired_vs_"):
                print(f"  paired over the windows, vs {key[len('paired_vs_'):]}: {100 * gap['change']:+.2f}% "
                      f"(standard error {100 * gap['standard_error']:.2f}%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
