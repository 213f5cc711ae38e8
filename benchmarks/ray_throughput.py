"""Throughput of the Ray fitness pool: one batch of distinct trees with 1 worker, then 2 workers.

Each worker has 1 CPU and 1 thread. The batch is ~8 known metrics and simple variants that induce
distinct masks, so the mask cache skips nothing. Printed: worker start time, batch time,
candidates per minute, every worker's memory (measured inside the actor: peak RSS, and after the
batch RSS, PSS and private memory), the model's fp32 size and the statistics' size for comparison, and as the last line
``speedup_2_vs_1: R``.

Also printed, the concurrency: the trees' own seconds summed, over the batch's wall time. It is
near the number of workers when they overlap; a speedup well below it means the workers did run
at once but each ran slower, that is the CPUs were not free.

The statistics (X, G) are prepared once by the driver and cached in ``--run-dir``; their
calibration (``--calib-nsamples`` x ``--calib-seqlen``) changes their values, not the cost of a
fitness evaluation, which is set by ``--seqlen`` x ``--windows``.

    python benchmarks/ray_throughput.py --calib-nsamples 4 --calib-seqlen 512
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import ray

from prunerzero.fitness.model_fitness import FitnessSettings
from prunerzero.fitness.ray_pool import (
    RayEvaluator,
    RaySettings,
    statistics_paths,
    statistics_ready,
)
from prunerzero.models import load_model, prunable_linears
from prunerzero.primitives.tree import Tree
from prunerzero.pruning.calibration import Calibration

TREES = [
    "abs(W)",  # magnitude
    "mul(abs(W), sqrt(X))",  # Wanda
    "mul(abs(mul(W, W)), mms(G))",  # the published Pruner-Zero tree
    "mul(abs(W), abs(G))",  # GBLM-like |W| * G
    "mul(abs(W), X)",
    "add(abs(W), mul(G, sqrt(X)))",
    "mul(sqrt(W), G)",
    "add(mms(abs(W)), mms(G))",
]


def run(settings: FitnessSettings, run_dir: str, workers: int, threads: int, batch: list[Tree]) -> dict:
    start = time.perf_counter()
    ev = RayEvaluator(settings, run_dir, RaySettings(workers=workers, cpus_per_worker=1.0, threads_per_worker=threads))
    try:
        startup = time.perf_counter() - start
        t0 = time.perf_counter()
        results = ev.evaluate(batch)
        seconds = time.perf_counter() - t0
        memory = ray.get([a.memory_mb.remote() for a in ev.actors])
    finally:
        ev.close()
    return {"workers": workers, "startup_s": startup, "batch_s": seconds, "per_min": 60 * len(batch) / seconds,
            "memory": memory, "results": results}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seqlen", type=int, default=1024, help="fitness window length")
    ap.add_argument("--windows", type=int, default=2, help="fitness windows per candidate")
    ap.add_argument("--calib-nsamples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--trees", type=int, default=len(TREES), help=f"batch size, at most {len(TREES)}")
    ap.add_argument("--run-dir", default="runs/ray_throughput")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")

    calibration = Calibration(nsamples=args.calib_nsamples, seqlen=args.calib_seqlen)
    settings = FitnessSettings(model=args.model, calibration=calibration, seqlen=args.seqlen, windows=args.windows)
    batch = [Tree.parse(t) for t in TREES[: args.trees]]

    model, _, _ = load_model(args.model)
    params = sum(p.numel() for p in model.parameters())
    linear_params = sum(lin.weight.numel() for lin in prunable_linears(model).values())
    del model
    print(f"model {args.model}: {params / 1e6:.1f}M parameters, fp32 {params * 4 / 2**20:.0f} MiB "
          f"(prunable linears {linear_params * 4 / 2**20:.0f} MiB)")
    print(f"fitness budget: {args.windows} x {args.seqlen} tokens; calibration {args.calib_nsamples} x "
          f"{args.calib_seqlen}; batch of {len(batch)} trees; {args.threads} thread(s) and 1 CPU per worker")
    print(f"cpus: {os.cpu_count()}, load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    cached = statistics_ready(settings, args.run_dir)
    runs = [run(settings, args.run_dir, 1, args.threads, batch)]
    files = statistics_paths(settings, args.run_dir)
    stats_mb = sum(f.stat().st_size for f in files) / 2**20
    print(f"statistics X+G: {stats_mb:.0f} MiB "
          f"({', '.join(f.name for f in files)}), "
          + ("found in the run folder" if cached else "computed by the driver during the first start"))
    runs.append(run(settings, args.run_dir, 2, args.threads, batch))

    first = runs[0]["results"]
    print(f"{'tree':32s} {'fitness':>12s} {'s (1 worker)':>13s} {'s (2 workers)':>14s}")
    for tree, r, r2 in zip(batch, first, runs[1]["results"]):
        print(f"{str(tree):32s} {r.fitness:12.4f} {r.seconds:13.1f} {r2.seconds:14.1f}"
              + (f"  [{r.reason}]" if r.reason else ""))
    same = [r.fitness for r in first] == [r.fitness for r in runs[1]["results"]]
    print(f"distinct masks: {len({r.mask_key for r in first})} of {len(first)}; "
          f"fitnesses equal with 1 and 2 workers: {same}")
    for r in runs:
        def each(key: str) -> str:
            return ", ".join(f"{m[key]:.0f}" if key in m else "?" for m in r["memory"])

        # Tree-seconds over wall seconds: how many trees were in evaluation at once on average.
        overlap = sum(x.seconds for x in r["results"]) / r["batch_s"]
        print(f"workers={r['workers']}: start {r['startup_s']:.1f} s, batch {r['batch_s']:.1f} s, "
              f"{r['per_min']:.2f} candidates/min, concurrency {overlap:.2f}")
        print(f"  memory per worker (MiB): peak RSS [{each('peak_rss')}]; after the batch: RSS [{each('rss')}], "
              f"PSS [{each('pss')}], private [{each('private')}]")
    target = 2 * params * 4 / 2**20 + stats_mb
    peaks = [m["peak_rss"] for r in runs for m in r["memory"] if "peak_rss" in m]
    verdict = f"highest peak RSS {max(peaks):.0f} MiB: {'met' if max(peaks) <= target else 'NOT met'}" if peaks else "no figures"
    print(f"target per worker: 2 x fp32 model + statistics = {target:.0f} MiB; {verdict}")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"speedup_2_vs_1: {runs[1]['per_min'] / runs[0]['per_min']:.2f}")


if __name__ == "__main__":
    main()
