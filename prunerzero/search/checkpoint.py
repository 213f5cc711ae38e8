"""The run folder: config, checkpoint, log, hall of fame, plot. JSON and YAML only, no pickle.

Every file is written to a temporary name and moved into place with ``os.replace``, so a crash
mid-write leaves the previous checkpoint intact; a crash costs at most the generation in flight.
"""

from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import yaml

from prunerzero.errors import UserError
from prunerzero.files import RUN_CHECKPOINT, RUN_FILES, read_json, write_atomic
from prunerzero.fitness.base import WORST_FITNESS
from prunerzero.primitives.known import KNOWN_METRICS, shipped_trees
from prunerzero.primitives.tree import Tree
from prunerzero.search.state import SearchState

STATE = RUN_CHECKPOINT
CONFIG = "config.yaml"
LOG = "log.jsonl"
HALL_OF_FAME = "hall_of_fame.json"
PLOT = "fitness.png"
PARETO_PLOT = "pareto.png"
LOCK = "search.lock"
FORMAT_VERSION = 1


def run_files(run_dir: Path) -> tuple[Path, ...]:
    """The files a run folder holds that no output may overwrite."""
    return tuple(Path(run_dir) / n for n in RUN_FILES)


def save_checkpoint(run_dir: Path, state: SearchState, fingerprint: dict[str, Any], hof_size: int) -> None:
    payload = {"format": FORMAT_VERSION, "fingerprint": fingerprint, **state.to_json()}
    write_atomic(run_dir / STATE, json.dumps(payload, indent=1, allow_nan=False))
    write_atomic(run_dir / LOG, "".join(json.dumps(r) + "\n" for r in state.log))
    write_atomic(run_dir / HALL_OF_FAME, json.dumps(export_trees(state, hof_size, fitness_label(fingerprint)), indent=2) + "\n")


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run folder for one search: a second search or a resume of a live run is refused
    with the holder's pid. The lock is the kernel's (flock), so a killed search leaves none behind."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise UserError(f"{run_dir} is in use by another search (pid {holder}); wait for it to finish, "
                            "or give this search another name") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def save_config(run_dir: Path, config: dict[str, Any]) -> None:
    write_atomic(run_dir / CONFIG, yaml.safe_dump(config, sort_keys=False))


def load_checkpoint(run_dir: Path) -> tuple[SearchState, dict[str, Any]]:
    path = Path(run_dir) / STATE
    if not path.is_file():
        raise UserError(f"{run_dir} holds no checkpoint ({STATE}); start a search with --config")
    data = read_json(path, "checkpoint")
    if not isinstance(data, dict):
        raise UserError(f"checkpoint {path} is not a JSON object; it was not written by prunerzero")
    if data.get("format") != FORMAT_VERSION:
        raise UserError(f"checkpoint {path} has format {data.get('format')!r}, this prunerzero reads {FORMAT_VERSION}")
    if not isinstance(data.get("fingerprint"), dict):
        raise UserError(f"checkpoint {path}: 'fingerprint' must be an object")
    try:
        return SearchState.from_json(data), data["fingerprint"]
    except UserError as e:
        raise UserError(f"checkpoint {path}: {e}") from None


def fingerprint_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Keys whose values differ, as dotted paths."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += fingerprint_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


PERPLEXITY = "perplexity on the fitness text (lower is better)"
RATIOS = "geometric mean of perplexity / the reference's (lower is better; 1 = the reference)"
RECONSTRUCTION = "relative output reconstruction error of one random linear layer (lower is better; not a perplexity)"


def fitness_label(fingerprint: dict[str, Any]) -> str:
    """What a run's fitness is, read from its checkpoint's fingerprint."""
    fitness = fingerprint.get("fitness") if isinstance(fingerprint, dict) else None
    if isinstance(fitness, dict) and fitness.get("settings"):
        return f"{RATIOS} over {len(fitness['settings'])} settings, reference {fitness.get('reference')}"
    return RECONSTRUCTION if isinstance(fitness, dict) and fitness.get("evaluator") == "reconstruction" else PERPLEXITY


def export_pareto(state: SearchState, label: str = PERPLEXITY) -> dict[str, Any]:
    """The Pareto front of fitness against tree size, smallest tree first, in the export format."""
    trees = []
    for r in state.pareto_front():
        tree = Tree.parse(r["tree"])
        trees.append({"rank": len(trees) + 1, "formula": r["tree"], "fitness": r["fitness"], "size": len(tree),
                      "generation": r["generation"], "tree": tree.to_json()})
    return {"format": "prunerzero-pareto", "fitness": label, "trees": trees}


def plot_pareto(run_dir: Path, state: SearchState) -> None:
    """Fitness against tree size of every fully measured metric, the front drawn over them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    good = [r for r in state.cache.values() if r["fitness"] < WORST_FITNESS and not r.get("estimated")]
    front = state.pareto_front()
    if not front:
        return
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.scatter([len(Tree.parse(r["tree"])) for r in good], [r["fitness"] for r in good], s=12, alpha=0.4,
               label="measured metrics")
    ax.step([len(Tree.parse(r["tree"])) for r in front], [r["fitness"] for r in front], where="post", marker="o",
            color="C3", label="Pareto front")
    for r in front[:6]:
        ax.annotate(r["tree"][:40], (len(Tree.parse(r["tree"])), r["fitness"]), fontsize=6, xytext=(4, 4),
                    textcoords="offset points")
    ax.set_xlabel("tree size (nodes)")
    ax.set_ylabel("fitness (lower is better)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title("fitness against size", fontsize=9)
    fig.tight_layout()
    save_figure(fig, run_dir / PARETO_PLOT)


def export_trees(state: SearchState, top: int, label: str = PERPLEXITY) -> dict[str, Any]:
    """The best distinct metrics in the Pruner-Zero JSON format, with formula and fitness."""
    trees = []
    for rank, r in enumerate(state.hall_of_fame(top), 1):
        tree = Tree.parse(r["tree"])
        trees.append({"rank": rank, "formula": r["tree"], "fitness": r["fitness"], "size": len(tree),
                      "generation": r["generation"], "tree": tree.to_json()})
    return {"fitness": label, "trees": trees}


def reference_fitness(cache: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The known and shipped metrics a run evaluated, on its own fitness text: what its best is measured
    against. "estimated": only on the low-fidelity budget (scaled), never promoted to the full one."""
    named = {name: m.tree for name, m in KNOWN_METRICS.items()}
    named.update({name: Tree.load(path) for name, path in shipped_trees().items()})
    out = {}
    for name, tree in named.items():
        hit = cache.get(tree.symbolic_key())
        if hit is not None and hit["fitness"] < WORST_FITNESS:
            out[name] = {"tree": str(tree), "fitness": hit["fitness"], "estimated": bool(hit.get("estimated"))}
    return out


FAR_ABOVE = 3.0  # fitness.png: references above this many times the worst best are named, not drawn


def plot_progress(run_dir: Path, state: SearchState) -> None:
    """Best and median fitness per generation, with the known metrics the run measured as dotted lines,
    into the run folder. The axis spans the best and the references (a generation-0 median far above
    them would flatten the part a reader looks at; it is named instead)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = [r for r in state.log if r["best"] is not None]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6.4, 4))
    gens = [r["generation"] for r in rows]
    best = [r["best"] for r in rows]
    ax.plot(gens, best, marker="o", label="best so far")
    med = [(r["generation"], r["median"]) for r in rows if r["median"] is not None and r["median"] < WORST_FITNESS]
    measured = {name: r["fitness"] for name, r in reference_fitness(state.cache).items() if not r["estimated"]}
    # a reference far above the best (magnitude at 2:4: twenty times Wanda) is named, not drawn
    refs = {name: v for name, v in measured.items() if v <= FAR_ABOVE * max(best)}
    far = sorted((v, name) for name, v in measured.items() if name not in refs)
    low = min(best + list(refs.values()))
    top = max([best[0], *refs.values()] + ([med[-1][1]] if med else []))
    top = low + 1.3 * (top - low) if top > low else low * 1.1
    notes = []
    if med:
        ax.plot(*zip(*med), marker=".", linestyle="--", label="population median")
        above = [(g, m) for g, m in med if m > top]
        if above:
            notes.append("median above the axis at generation " + ", ".join(f"{g} ({m:.4g})" for g, m in above[:3])
                         + (" ..." if len(above) > 3 else ""))
    if far:
        notes.append("above the axis: " + ", ".join(f"{name} {v:.4g}" for v, name in far))
    if notes:
        ax.text(0.99, 0.98, "\n".join(notes), transform=ax.transAxes, ha="right", va="top", fontsize=7)
    for (name, value), color in zip(sorted(refs.items(), key=lambda kv: kv[1]), ("k", "tab:red", "tab:green", "tab:purple", "tab:brown", "tab:gray")):
        ax.axhline(value, color=color, linestyle=":", linewidth=1, label=f"{name} {value:.4g}")
    ax.set_ylim(low - 0.05 * (top - low) if top > low else low * 0.9, top)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("generation")
    ax.set_ylabel("fitness (lower is better)")
    ax.set_title(f"search progress, best: {rows[-1]['best_tree']}"[:90], fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3)
    fig.tight_layout()
    save_figure(fig, run_dir / PLOT)


def save_figure(fig: Any, path: Path) -> None:
    """A matplotlib figure written atomically, through a temporary file unique to this writer."""
    import tempfile

    import matplotlib.pyplot as plt

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
