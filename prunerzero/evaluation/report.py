"""``prunerzero report RUN``: one self-contained HTML page about a search run.

The page shows the run's configuration, its best metrics, the search counters and the
fitness-over-generations plot, all read from the run folder (no model is loaded). With
``--sweep`` it also measures WikiText-2 *test* perplexity of the top metrics against the
baselines (:mod:`prunerzero.evaluation.sweep`); the sweep is written to ``RUN/sweep.json`` and
``RUN/sweep.png``, and a later report without ``--sweep`` shows it again.
"""


import argparse
import base64
import html
import json
import logging
import math
from pathlib import Path
from typing import Any

import yaml

from prunerzero import runfolder
from prunerzero.errors import UserError
from prunerzero.evaluation.plots import allocation_figure, fitness_figure, is_finite, shorten, sweep_figure
from prunerzero.evaluation.sweep import SWEEP_JSON, SWEEP_PLOT, now_utc, run_sweep
from prunerzero.files import check_output_path, write_atomic
from prunerzero.primitives.known import KNOWN_METRICS
from prunerzero.primitives.tree import Tree
from prunerzero.verdict import format_verdict, verdict

log = logging.getLogger(__name__)

REPORT = "report.html"
COUNTERS = (
    ("generated", "candidates generated", "children and initial individuals created"),
    ("simplified", "simplified", "candidates rewritten to a smaller equivalent formula"),
    ("regenerated", "regenerated", "re-mutations of children that duplicated a parent or an evaluated metric"),
    ("formula_cache_hits", "formula-cache hits", "candidates whose canonical formula was already evaluated"),
    ("mask_cache_hits", "mask-cache hits", "new formulas whose masks equal an earlier metric's (not re-measured)"),
    ("evaluated", "evaluated", "fitness evaluations actually run"),
    ("degenerate", "degenerate", "metrics that cannot rank weights (constant, NaN or Inf)"),
)


# ---------------------------------------------------------------------------------------- sweep


CSS = """
.verdict{border-radius:6px;padding:.6em 1em;margin:1em 0} .verdict.found{background:#e8f5e9;border:1px solid #81c784} .verdict.none{background:#fff8e1;border:1px solid #ffd54f} .verdict pre{margin:.3em 0 0;font-size:.85em;white-space:pre-wrap}
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em;margin-bottom:.2em} h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
.meta{color:#666;font-size:.9em} table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
th,td{border:1px solid #ddd;padding:.3em .6em;text-align:left;vertical-align:top} th{background:#f5f5f5}
td.num{text-align:right;font-variant-numeric:tabular-nums} code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.92em}
tr.best td{font-weight:600} td.best{font-weight:700;background:#eef6ee} img{max-width:100%;border:1px solid #eee}
pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:.85em} .note{color:#555;font-size:.9em}
details summary{cursor:pointer;color:#446}
"""


BEST_ROW = ' class="best"'


def _e(v: Any) -> str:
    return html.escape(str(v))


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:.4g}"
    return str(v)


def _ppl(v: Any) -> str:
    """A perplexity for a table: 31.58, 321.57, 1,405, 31,455."""
    if not is_finite(v):
        return "–" if v is None else _e(v)
    return f"{v:.2f}" if v < 1000 else f"{v:,.0f}"


def _flatten(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out += _flatten(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", ", ".join(map(str, v)) if isinstance(v, list) else v))
    return out


def fitness_label(cfg: dict[str, Any] | None) -> str:
    if not cfg:
        return "fitness"
    f = cfg.get("fitness") or {}
    where = f"{f.get('sparsity', 0.5):g} {f.get('pattern', 'unstructured')}"
    if (cfg.get("evaluator") or {}).get("type") == "reconstruction":
        return f"relative reconstruction error of a random layer pruned at {where}"
    return (f"perplexity on {f.get('text', 'wikitext2')}:{f.get('split', 'validation')} ({f.get('windows')} × "
            f"{f.get('seqlen')} tokens), model pruned at {where}")


def _known_metrics(state: Any) -> list[tuple[str, str, float]]:
    out = []
    for name, metric in KNOWN_METRICS.items():
        try:
            out.append((name, metric.formula, state.fitness_of(metric.formula)))
        except KeyError:
            pass
    return out


def _sweep_html(sweep: dict[str, Any], png: bytes | None, fresh: bool, json_path: Path) -> str:
    cells = list(dict.fromkeys((c["pattern"], c["sparsity"]) for c in sweep["cells"]))
    by = {(c["method"], c["pattern"], c["sparsity"]): c for c in sweep["cells"]}
    best = {}
    for cell in cells:
        vals = [c["ppl"] for c in sweep["cells"] if (c["pattern"], c["sparsity"]) == cell and is_finite(c["ppl"])]
        best[cell] = min(vals) if vals else None
    head = "".join(f"<th>{_e(f'{s:.0%}' if p == 'unstructured' else p)}</th>" for p, s in cells)
    body = []
    for m in sweep["methods"]:
        tds = []
        for cell in cells:
            c = by.get((m["label"], *cell))
            v = c["ppl"] if c else None
            cls = "num best" if v is not None and v == best[cell] else "num"
            tip = f' title="actual sparsity {c["sparsity_actual"]:.4f}, {c["seconds"]} s"' if c else ""
            tds.append(f'<td class="{cls}"{tip}>{_ppl(v)}</td>')
        name = f"<code>{_e(m['label'])}</code>" if m["kind"] == "tree" else _e(m["label"])
        body.append(f"<tr><td>{name}</td>{''.join(tds)}</tr>")
    ev = sweep.get("eval", {})
    cal = sweep.get("calibration") or {}
    origin = "Measured now" if fresh else f"Read from {_e(json_path.name)} (made {_e(sweep.get('made', '?'))}); rerun with --sweep to refresh"
    parts = [
        f'<p class="note">Model <code>{_e(sweep.get("model", "?"))}</code> on {_e(sweep.get("device", "?"))}; '
        f'WikiText-2 test perplexity over the first {_e(ev.get("windows"))} windows of {_e(ev.get("seqlen"))} tokens '
        f'({_e(ev.get("tokens"))} tokens); calibration {_e(cal.get("source", "?"))}:{_e(cal.get("split") or "")} '
        f'{_e(cal.get("nsamples", "?"))} × {_e(cal.get("seqlen", "?"))} tokens, seed {_e(cal.get("seed", "?"))}. '
        f'Dense model: <b>{_ppl(sweep.get("dense_ppl"))}</b>. {origin}. The whole sweep took {_e(sweep.get("seconds", "?"))} s.</p>',
        _img(png, "perplexity against sparsity") if png else "",
        f"<table><tr><th>method</th>{head}</tr>{''.join(body)}</table>",
        '<p class="note">Columns are unstructured sparsities, then N:M patterns; the lowest perplexity of each column is '
        "highlighted. Every cell starts from the dense weights.</p>",
    ]
    return "\n".join(parts)


def render_html(run_dir: Path, state: Any, cfg: dict[str, Any] | None, config_text: str | None, hof: list[dict[str, Any]],
                fitness_png: bytes | None, sweep: dict[str, Any] | None, sweep_png: bytes | None, sweep_fresh: bool,
                top: int, verdict_lines: list[str] | None = None) -> str:
    name = (cfg or {}).get("name") or run_dir.name
    evaluator = ((cfg or {}).get("evaluator") or {}).get("type", "?")
    model = ((cfg or {}).get("model") or {}).get("name", "?") if evaluator != "reconstruction" else "none (reconstruction evaluator)"
    generations = state.generation
    allocation = ((cfg or {}).get("search") or {}).get("space") == "allocation"
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>prunerzero report: {_e(name)}</title>",
           f"<style>{CSS}</style></head><body>",
           f"<h1>Pruner-Zero search: {_e(name)}</h1>",
           f'<p class="meta">Run folder <code>{_e(run_dir)}</code> · report made {_e(now_utc())} · '
           f"{f'generations 0–{generations} done' if generations >= 0 else 'no generation done yet'} · "
           f"{len(state.cache)} distinct {'functions' if allocation else 'metrics'} seen · evaluator {_e(evaluator)} · model {_e(model)}</p>"]

    if verdict_lines:
        found = "found a metric past" in verdict_lines[0]
        out.append(f'<div class="verdict {"found" if found else "none"}"><p><b>{_e(verdict_lines[0].removeprefix("verdict: "))}</b></p>'
                   f'<pre>{_e(chr(10).join(line.strip() for line in verdict_lines[1:]))}</pre></div>')
    what, alike = (("allocation functions", "Functions that give the same per-layer counts") if allocation
                   else ("metrics", "Metrics that prune alike (same masks)"))
    out.append(f"<h2>Best {what}</h2>")
    if hof:
        out.append(f'<p class="note">Fitness: {_e(fitness_label(cfg))}; lower is better. {alike} are listed once, '
                   f"by their smallest formula. The top {top} {'is' if top == 1 else 'are'} the ones a sweep compares.</p>")
        rows = "".join(
            f"<tr{BEST_ROW if r['rank'] == 1 else ''}><td class='num'>{r['rank']}</td><td><code>{_e(r['formula'])}</code></td>"
            f"<td class='num'>{r['size']}</td><td class='num'>{_fmt(r['fitness'], 6)}</td><td class='num'>{r['generation']}</td></tr>"
            for r in hof)
        out.append(f"<table><tr><th>rank</th><th>formula</th><th>size</th><th>fitness</th><th>generation found</th></tr>{rows}</table>")
    else:
        out.append('<p class="note">No metric has been evaluated yet.</p>')
    known = _known_metrics(state)
    if known:
        rows = "".join(f"<tr><td>{_e(n)}</td><td><code>{_e(f)}</code></td><td class='num'>{_fmt(v, 6)}</td></tr>" for n, f, v in known)
        out.append(f'<p class="note">Known metrics, as measured by this search:</p>'
                   f"<table><tr><th>metric</th><th>formula</th><th>fitness</th></tr>{rows}</table>")

    out.append("<h2>Search counters</h2>")
    c = state.counters
    rows = "".join(f"<tr><td>{_e(label)}</td><td class='num'>{c.get(key, 0)}</td><td class='note'>{_e(doc)}</td></tr>"
                   for key, label, doc in COUNTERS)
    out.append(f"<table><tr><th>counter</th><th>total</th><th>meaning</th></tr>{rows}</table>")

    out.append("<h2>Fitness over generations</h2>")
    out.append(_img(fitness_png, "fitness over generations") if fitness_png else '<p class="note">No generation logged yet.</p>')

    front = state.pareto_front()
    if front:
        out.append("<h2>Fitness against size (Pareto front)</h2>")
        out.append('<p class="note">Metrics no other beats on both fitness and size; '
                   f'<code>prunerzero export {_e(run_dir)} --pareto</code> writes them.</p>')
        rows = "".join(f"<tr><td class='num'>{len(Tree.parse(r['tree']))}</td><td class='num'>{_fmt(r['fitness'])}</td>"
                       f"<td><code>{_e(r['tree'])}</code></td></tr>" for r in front)
        out.append(f"<table><tr><th>size</th><th>fitness</th><th>metric</th></tr>{rows}</table>")
        pareto = run_dir / runfolder.PARETO_PLOT
        if pareto.is_file():
            out.append(_img(pareto.read_bytes(), "fitness against tree size"))

    alloc_path = run_dir / "allocation.json"
    if alloc_path.is_file():
        a = json.loads(alloc_path.read_text())
        ref = a.get("reference") or {}
        out.append("<h2>Layerwise allocation</h2>")
        out.append(f'<p class="note">The best allocation function, <code>{_e(a.get("function"))}</code> (metric '
                   f'<code>{_e(a.get("metric"))}</code>, target {_e(a.get("target"))}, {_e(a.get("pruned_weights"))} of '
                   f'{_e(a.get("weights"))} weights pruned): fitness {_fmt(a.get("fitness"), 6)}, against OWL '
                   f'{_fmt(ref.get("owl"), 6)} and uniform {_fmt(ref.get("uniform"), 6)} on the same text. '
                   f'<code>prunerzero prune --allocation {_e(alloc_path)}</code> uses it.</p>')
        out.append(_img(allocation_figure(a, state.log, run_dir / "allocation.png"), "searched allocation"))

    out.append("<h2>Sparsity sweep</h2>")
    if sweep:
        out.append(_sweep_html(sweep, sweep_png, sweep_fresh, run_dir / SWEEP_JSON))
    elif evaluator == "reconstruction":
        out.append('<p class="note">No sweep: this run used the reconstruction evaluator and has no model.</p>')
    else:
        out.append(f'<p class="note">No sweep yet. <code>prunerzero report {_e(run_dir)} --sweep</code> measures test perplexity '
                   "of the top metrics against magnitude, Wanda and SparseGPT (loads the model; one pruning per cell).</p>")

    out.append("<h2>Configuration</h2>")
    if cfg:
        rows = "".join(f"<tr><td><code>{_e(k)}</code></td><td>{_e(v)}</td></tr>" for k, v in _flatten(cfg))
        out.append(f"<table><tr><th>key</th><th>value</th></tr>{rows}</table>")
        out.append(f"<details><summary>config.yaml</summary><pre>{_e(config_text)}</pre></details>")
    else:
        out.append('<p class="note">The run folder has no readable config.yaml.</p>')
    out.append("</body></html>\n")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------- command
def _read_config(run_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    path = run_dir / runfolder.CONFIG
    if not path.is_file():
        return None, None
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    return (data if isinstance(data, dict) else None), text


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def make_report(args: argparse.Namespace) -> Path:
    run_dir = Path(args.run)
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} does not exist; give a folder made by `prunerzero search` (runs/NAME)")
    out = check_output_path(args.out if args.out else run_dir / REPORT, "--out", own=(REPORT,), own_run=run_dir)
    state, _ = runfolder.run_state(run_dir)
    cfg, config_text = _read_config(run_dir)
    hof = runfolder.best_trees(state, max(args.top, 10))
    sweep, sweep_png, fresh = None, None, False
    if args.sweep:
        if cfg is None:
            raise UserError(f"{run_dir} has no readable {runfolder.CONFIG}; the sweep needs the run's model and calibration")
        if (cfg.get("evaluator") or {}).get("type") == "reconstruction":
            raise UserError(f"the sweep needs a model-based run: {run_dir} was searched with the reconstruction evaluator, "
                            "which has no model (run the report without --sweep)")
        if not hof:
            raise UserError(f"{run_dir} has no evaluated metric yet; nothing to sweep")
        sweep = run_sweep(run_dir, cfg, hof[: args.top], args)
        write_atomic(run_dir / SWEEP_JSON, json.dumps(_json_safe(sweep), indent=1) + "\n")
        log.info("wrote %s", run_dir / SWEEP_JSON)
        fresh = True
    elif (run_dir / SWEEP_JSON).is_file():
        try:
            sweep = json.loads((run_dir / SWEEP_JSON).read_text())
        except json.JSONDecodeError:
            log.warning("%s is not valid JSON; the report shows no sweep", run_dir / SWEEP_JSON)
    if sweep:
        sweep_png = sweep_figure(sweep, run_dir / SWEEP_PLOT, f"{sweep.get('model', '')}: test perplexity of the pruned model")
    fitness_png = fitness_figure(state, "fitness (log scale, lower is better)", shorten(fitness_label(cfg), 100),
                                 run_dir / runfolder.PLOT)
    allocation = ((cfg or {}).get("search") or {}).get("space") == "allocation"
    lines = [] if allocation else format_verdict({**verdict(run_dir, state), "report": str(out)}, writing=("report",))
    page = render_html(run_dir, state, cfg, config_text, hof, fitness_png, sweep, sweep_png, fresh, args.top, lines)
    write_atomic(out, page)
    return out, lines

