"""``prunerzero report``: an HTML report of a run (config, best metrics, plots, sparsity sweep)."""

from __future__ import annotations

import argparse
from typing import Any

from prunerzero.cli.common import positive_int
from prunerzero.evaluation.report import REPORT, make_report
from prunerzero.evaluation.sweep import DEFAULT_PATTERNS, DEFAULT_SPARSITIES, SWEEP_JSON, SWEEP_PLOT


def cmd_report(args: argparse.Namespace) -> None:
    out, lines = make_report(args)
    print("\n".join([*lines, f"wrote {out}"]))


def register(sub: Any) -> None:
    p = sub.add_parser("report", help="HTML report of a search run (config, best metrics, counters, plots; --sweep: perplexity sweep)")
    p.add_argument("run", help="run folder (runs/NAME)")
    p.add_argument("--out", metavar="FILE.html", default=None, help=f"output HTML file (default RUN/{REPORT})")
    p.add_argument("--top", type=positive_int, metavar="K", default=3, help="metrics compared in the sweep (default 3); the table lists max(K, 10)")
    p.add_argument("--sweep", action="store_true", help="measure WikiText-2 test perplexity of the top metrics and the baselines "
                   f"at several sparsities (loads the model; writes RUN/{SWEEP_JSON} and RUN/{SWEEP_PLOT})")
    p.add_argument("--sweep-windows", type=positive_int, metavar="W", default=4, help="evaluate the first W test windows (default 4)")
    p.add_argument("--sweep-sparsities", metavar="S1,S2,...", default=",".join(map(str, DEFAULT_SPARSITIES)),
                   help="unstructured sparsities, comma separated (default 0.3,0.4,0.5,0.6,0.7)")
    p.add_argument("--patterns", metavar="N:M,...", default=",".join(DEFAULT_PATTERNS), help="N:M patterns, comma separated, or none (default 2:4,4:8)")
    p.add_argument("--nsamples", type=positive_int, metavar="N", default=None, help="calibration windows (default: the run's)")
    p.add_argument("--seqlen", type=positive_int, metavar="L", default=None, help="tokens per calibration window (default: the run's)")
    p.add_argument("--eval-seqlen", type=positive_int, metavar="S", default=None, help="tokens per test window (default 1024 on CPU, 2048 on GPU)")
    p.add_argument("--device", default=None, help="cpu, cuda, auto (default: the run's)")
    p.add_argument("--data-dir", default=None, help="data folder (default: the run's, else $PRUNERZERO_DATA, ../shared/data)")
    p.add_argument("--cache-dir", default=None, help="gradient cache when the calibration differs from the run's "
                   "(default ~/.cache/prunerzero/gradients)")
    p.set_defaults(func=cmd_report)
