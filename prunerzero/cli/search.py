"""``prunerzero search | export | heldout | rescore``: run, resume, export and check searches."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from prunerzero.choices import COMPARED, STATS_MODES, one_of
from prunerzero.cli.common import metric_list
from prunerzero.config import LIMITS, HeldoutSection, load_config
from prunerzero.config_rules import validate
from prunerzero.errors import UserError
from prunerzero.evaluation.heldout import format_table
from prunerzero.evaluation.rescore import RescoreSettings, format_rescore, rescore_run
from prunerzero.files import check_output_path, write_json
from prunerzero.runfolder import run_config
from prunerzero.runs import (
    apply_allocation_function,
    check_run_folder,
    fingerprint,
    run_heldout,
    run_search,
)
from prunerzero.search import checkpoint as ckpt
from prunerzero.search.state import stalled
from prunerzero.verdict import format_verdict, verdict

log = logging.getLogger(__name__)


def cmd_search(args: argparse.Namespace) -> None:
    if args.seed is not None and not 0 <= args.seed <= LIMITS["seed"]:
        raise UserError(f"--seed must be between 0 and {LIMITS['seed']}, got {args.seed}")
    if args.patience is not None and args.patience < 1:
        raise UserError(f"--patience must be at least 1 generation, got {args.patience}")
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / ckpt.CONFIG).is_file():
            raise UserError(f"{run_dir} is not a run folder (no {ckpt.CONFIG}); give the folder printed when the search started")
        cfg = load_config(args.config) if args.config else run_config(run_dir)
        cfg.output_dir, cfg.name = str(run_dir.parent), run_dir.name
        if args.seed is not None and args.seed != cfg.seed:
            raise UserError(f"--seed {args.seed} cannot change a run's seed (it was {cfg.seed}); start a new run with "
                            f"--config FILE --seed {args.seed} --name NAME")
        validate(cfg)
    elif args.config:
        cfg = load_config(args.config)
        if args.name is not None:
            cfg.name = args.name
        if args.output_dir is not None:
            cfg.output_dir = args.output_dir
        if args.seed is not None:
            cfg.seed = args.seed
        validate(cfg)
    else:
        raise UserError("give --config FILE.yaml to start a search, or --resume runs/NAME to continue one")
    if args.patience is not None:
        cfg.search.patience = args.patience
        validate(cfg)
    check_run_folder(cfg.run_dir, bool(args.resume))
    if args.dry_run:
        fp = fingerprint(cfg)
        print(json.dumps({"valid": True, "run_dir": str(cfg.run_dir), "fingerprint": fp}, indent=2))
        return
    state = run_search(cfg, resume=bool(args.resume), force=args.force, generations=args.generations,
                       max_minutes=args.max_minutes)
    for r in ckpt.export_trees(state, 5)["trees"]:
        print(f"{r['rank']:>2}. fitness {r['fitness']:.4f}  size {r['size']:>2}  {r['formula']}")
    total = args.generations if args.generations is not None else cfg.search.generations
    if state.generation < total and not stalled(state.log, cfg.search.patience, cfg.search.min_improvement):
        return  # stopped by --max-minutes: the held-out evaluation waits for the finished search
    if cfg.heldout is not None and cfg.evaluator.type != "reconstruction" and not args.no_heldout:
        print(format_table(run_heldout(cfg.run_dir, cfg, state), cfg.heldout.texts))
    if cfg.search.space != "allocation":
        print("\n".join(format_verdict(verdict(cfg.run_dir, state))))


def cmd_heldout(args: argparse.Namespace) -> None:
    run_dir = Path(args.run)
    cfg = run_config(run_dir)
    state, _ = ckpt.load_checkpoint(run_dir)
    h = cfg.heldout or HeldoutSection()
    h = HeldoutSection(top_k=h.top_k if args.top_k is None else args.top_k, baselines=h.baselines,
                       texts=args.texts.split(",") if args.texts else h.texts,
                       windows=h.windows if args.windows is None else args.windows,
                       seqlen=h.seqlen if args.seqlen is None else args.seqlen)
    cfg.heldout = h
    validate(cfg)
    print(format_table(run_heldout(run_dir, cfg, state, h), h.texts))


def cmd_rescore(args: argparse.Namespace) -> None:
    cfg = run_config(Path(args.run))
    # a rule inside the weight update is compared with SparseGPT's own rule first
    default = ("sparsegpt", *COMPARED) if cfg.fitness.update == "obs" else COMPARED
    settings = RescoreSettings(top=args.top, windows=args.windows, seqlen=args.seqlen, stats_mode=args.stats,
                               nsamples=args.nsamples, calib_seqlen=args.calib_seqlen,
                               baselines=metric_list(args.baselines) if args.baselines else default)
    print(format_rescore(rescore_run(Path(args.run), cfg, settings)))


def cmd_export(args: argparse.Namespace) -> None:
    run_dir = Path(args.run)
    if args.top < 1:
        raise UserError(f"--top must be at least 1, got {args.top}")
    state, fp = ckpt.load_checkpoint(run_dir)
    label = ckpt.fitness_label(fp)
    data = ckpt.export_pareto(state, label) if args.pareto else ckpt.export_trees(state, args.top, label)
    if not data["trees"]:
        raise UserError(f"{run_dir} has no evaluated metric yet")
    fitness = fp.get("fitness", {})
    if fitness.get("update", "none") != "none":  # prune --tree FILE applies the update the trees were found with
        data["update"], data["obs_scope"] = fitness["update"], fitness.get("obs_scope", "block")
    default = "pareto.json" if args.pareto else "export.json"
    out = Path(args.out) if args.out else run_dir / default
    tree_files = [out.parent / f"{out.stem}-rank{r['rank']}.json" for r in data["trees"]] if args.tree_files else []
    for path in (out, *tree_files):  # all checked before the first is written
        check_output_path(path, "--out", own=("export.json", "pareto.json", *(p.name for p in tree_files)), own_run=run_dir)
    write_json(out, data)
    for path, r in zip(tree_files, data["trees"]):
        write_json(path, r["tree"])
    for r in data["trees"]:
        print(f"{r['rank']:>2}. fitness {r['fitness']:.4f}  size {r['size']:>2}  gen {r['generation']:>3}  {r['formula']}")
    print(f"wrote {out} (load a tree with: prunerzero prune --method tree --tree {out})")


def cmd_allocate(args: argparse.Namespace) -> None:
    run_dir = Path(args.run)
    out = check_output_path(args.out, "--out")
    data = apply_allocation_function(run_dir, args.sparsity, out, args.function)
    ratios = list(data["layers"].values())
    print(f"wrote {out}: {data['function']} at target {data['target']}, layers {min(ratios):.3f} to "
          f"{max(ratios):.3f} (prune with: prunerzero prune --method tree --tree '{data['metric']}' --allocation {out})")


def register(sub: Any) -> None:
    p = sub.add_parser("search", help="evolve pruning metrics (start from a YAML config, or resume a run)")
    p.add_argument("--config", default=None, help="YAML config (configs/smollm2-135m.yaml, configs/quick.yaml, ...)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the search in this run folder")
    p.add_argument("--generations", type=int, default=None, help="total generations to reach (default: the config's)")
    p.add_argument("--name", default=None, help="run name (folder under output_dir); default: the config's")
    p.add_argument("--output-dir", default=None)
    p.add_argument("--seed", type=int, default=None, help="search seed of a new run (default: the config's); "
                                                          "with --name, several seeds of one config side by side")
    p.add_argument("--force", action="store_true", help="resume even if the search space or fitness changed")
    p.add_argument("--dry-run", action="store_true", help="validate the config and exit, loading nothing")
    p.add_argument("--no-heldout", action="store_true", help="skip the held-out evaluation at the end")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="begin no generation after this many minutes (loading included): the run stops at a "
                        "checkpoint and --resume continues it exactly; for runs split across sessions or jobs")
    p.add_argument("--patience", type=int, default=None, metavar="N",
                   help="stop once the best fitness has not improved for N generations (search.patience; "
                        "search.min_improvement sets what counts); may change on --resume")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("heldout", help="held-out perplexity of a run's best metrics and the baselines (resumable)")
    p.add_argument("run", help="run folder (runs/NAME)")
    p.add_argument("--top-k", type=int, default=None, help="metrics of the hall of fame to measure (default: the config's)")
    p.add_argument("--texts", default=None, help="comma separated: wikitext2:test,c4:validation")
    p.add_argument("--windows", type=int, default=None, help="evaluation windows per text (default: the config's)")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per evaluation window")
    p.set_defaults(func=cmd_heldout)

    p = sub.add_parser("rescore", help="the hall of fame's best and the known metrics on validation windows the search "
                                        "never used: pick what to ship (resumable; the test split is not touched)")
    p.add_argument("run", help="run folder (runs/NAME)")
    p.add_argument("--top", type=int, default=10, help="metrics of the hall of fame to re-score (default 10)")
    p.add_argument("--windows", type=int, default=8, help="unused validation windows (default 8)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per window (default 2048, as the test)")
    p.add_argument("--stats", type=one_of(STATS_MODES, "--stats"), metavar="{" + ",".join(STATS_MODES) + "}",
                   default="sequential",
                   help="X from the dense model (once) or block by block on the partly pruned one, as the final "
                        "pruning (sequential, default)")
    p.add_argument("--nsamples", type=int, default=None, help="calibration windows (default: the run's)")
    p.add_argument("--calib-seqlen", type=int, default=None, help="calibration window length (default: the run's)")
    p.add_argument("--baselines", default=None,
                   help=f"comma separated known or shipped metric names or formulas (default {','.join(COMPARED)}; "
                        "runs with the weight update: sparsegpt first)")
    p.set_defaults(func=cmd_rescore)

    p = sub.add_parser("export", help="write the best trees of a run in the Pruner-Zero JSON format")
    p.add_argument("run", help="run folder (runs/NAME)")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--out", default=None, help="output JSON (default RUN/export.json); loadable by prune --tree")
    p.add_argument("--tree-files", action="store_true", help="also write one bare tree file per rank")
    p.add_argument("--pareto", action="store_true", help="export the Pareto front of fitness against size instead")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("allocate", help="an allocation run's function applied at another target sparsity (a file "
                                         "for prune --allocation)")
    p.add_argument("run", help="an allocation search's run folder (runs/NAME)")
    p.add_argument("--sparsity", type=float, required=True, help="the target sparsity to allocate")
    p.add_argument("--function", default=None, help="the allocation function (default: the run's best)")
    p.add_argument("--out", required=True, help="the allocation JSON to write")
    p.set_defaults(func=cmd_allocate)
