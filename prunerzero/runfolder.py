"""Reading a run folder: its config, the fitness settings it was searched with, its best trees.

What the commands that measure a finished run (``report``, the re-score, the held-out step,
benchmarks) need from a folder a search wrote, as public functions: they never reach into the
search's checkpoint code. Writing the folder is :mod:`prunerzero.search.checkpoint`'s job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prunerzero.config import CalibrationSection, SearchConfig, config_from_dict, config_mapping
from prunerzero.errors import UserError
from prunerzero.files import load_yaml
from prunerzero.fitness.model_fitness import FitnessSettings
from prunerzero.models import pick_device
from prunerzero.pruning.calibration import Calibration
from prunerzero.search import checkpoint as ckpt
from prunerzero.search.state import SearchState

CONFIG = ckpt.CONFIG
PLOT = ckpt.PLOT
PARETO_PLOT = ckpt.PARETO_PLOT


def run_config(run_dir: Path) -> SearchConfig:
    """The config a run folder was searched with (checked as any config), pointing at that folder."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise UserError(f"{run_dir} is not a run folder (no {CONFIG}); give the folder printed when the search started")
    cfg = config_from_dict(config_mapping(load_yaml(run_dir / CONFIG, "run config"), run_dir / CONFIG))
    cfg.output_dir, cfg.name = str(run_dir.parent), run_dir.name
    return cfg


def run_state(run_dir: Path) -> tuple[SearchState, dict[str, Any]]:
    """A run's last checkpoint: its search state and fingerprint."""
    return ckpt.load_checkpoint(Path(run_dir))


def best_trees(state: SearchState, top: int, label: str = ckpt.PERPLEXITY) -> list[dict[str, Any]]:
    """A run's ``top`` best trees as export rows (rank, formula, fitness, generation, tree)."""
    return ckpt.export_trees(state, top, label)["trees"]


def fitness_settings(cfg: SearchConfig, resolve_device: bool = True) -> FitnessSettings:
    """The fitness a config's search measures (a model search; not the reconstruction stand-in)."""
    c, f, a = cfg.calibration, cfg.fitness, cfg.fitness.allocation
    alloc = {} if a is None or a.method == "searched" else {"allocation": a.method, "owl_m": a.m, "owl_lambda": a.lam,
                                                            "sparsity_range": (a.range[0], a.range[1])}
    return FitnessSettings(
        model=cfg.model.name, sparsity=f.sparsity, pattern=f.pattern,
        calibration=Calibration(c.source, c.split, c.nsamples, c.seqlen, c.seed, c.data_dir),
        gradient_calibration=gradient_calibration(c),
        text=f.text, split=f.split, seqlen=f.seqlen, windows=f.windows, stats_mode=f.stats_mode,
        update=f.update, obs_scope=f.obs_scope,
        device=pick_device(cfg.model.device) if resolve_device else cfg.model.device, **alloc,
    )


def gradient_calibration(c: CalibrationSection) -> Calibration | None:
    """The windows G is computed from when they differ from X's (``calibration.gradient_*``)."""
    if c.gradient_nsamples is None and c.gradient_seqlen is None:
        return None
    return Calibration(c.source, c.split, c.gradient_nsamples or c.nsamples, c.gradient_seqlen or c.seqlen, c.seed,
                       c.data_dir)
