"""The verdict at the end of a search: it says whether the best beat Wanda, on what, and where the outputs are."""

import json

import yaml

from prunerzero.cli import main
from prunerzero.primitives.known import KNOWN_METRICS
from prunerzero.search import checkpoint as ckpt
from prunerzero.verdict import format_verdict, verdict


def reconstruction_run(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"name": "r", "output_dir": str(tmp_path / "runs"), "seed": 3,
                                   "search": {"population": 8, "generations": 2},
                                   "evaluator": {"type": "reconstruction"}}))
    assert main(["search", "--config", str(cfg)]) == 0
    return tmp_path / "runs" / "r", capsys.readouterr().out


def test_a_run_whose_best_is_wanda_says_so_and_how_to_go_on(tmp_path, capsys):
    run, printed = reconstruction_run(tmp_path, capsys)
    state, _ = ckpt.load_checkpoint(run)
    wanda = state.cache[KNOWN_METRICS["wanda"].tree.symbolic_key()]["fitness"]
    assert state.hall_of_fame(1)[0]["fitness"] == wanda  # this tiny run does not get past Wanda
    lines = format_verdict(verdict(run, state))
    assert lines[0].startswith("verdict: no metric beat Wanda in this run (its best scores as wanda does")
    assert f"--resume {run}" in lines[0] and "--seed" in lines[0]
    assert f"wanda {wanda:.4f} (+0.00%)" in lines[2]
    assert "\n".join(lines) in printed  # the search ends with it
    assert "(not yet: prunerzero export" in lines[-1]


def test_a_run_past_wanda_names_the_metric_the_margins_and_the_outputs(tmp_path, capsys):
    run, _ = reconstruction_run(tmp_path, capsys)
    data = json.loads((run / ckpt.STATE).read_text())
    wanda = data["cache"][KNOWN_METRICS["wanda"].tree.symbolic_key()]["fitness"]
    known = {m.tree.symbolic_key() for m in KNOWN_METRICS.values()}
    key, record = next((k, r) for k, r in data["cache"].items() if k not in known and r["fitness"] > wanda)
    record["fitness"] = wanda / 2  # as if this metric had been measured at half Wanda's error
    (run / ckpt.STATE).write_text(json.dumps(data))
    assert main(["export", str(run)]) == 0 and main(["report", str(run)]) == 0
    printed = capsys.readouterr().out
    state, _ = ckpt.load_checkpoint(run)
    lines = format_verdict(verdict(run, state))
    assert lines[0].startswith("verdict: the search found a metric past wanda")
    assert record["tree"] in lines[1] and "(-50.00%)" in lines[2]
    assert str(run / "export.json") in lines[-1] and str(run / "report.html") in lines[-1]
    assert lines[0] in printed
    page = (run / "report.html").read_text()
    assert page.index('class="verdict found"') < page.index("<h2>Best metrics</h2>")
    assert "found a metric past wanda" in page
