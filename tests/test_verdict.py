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


def test_an_update_aware_run_is_judged_against_sparsegpt_and_names_a_known_best(tmp_path):
    refs = {"sparsegpt": {"formula": "sqr(mul(W, D))", "fitness": 45.674, "estimated": False},
            "ria": {"formula": "mul(add(coln(W), rown(W)), sqrt(sqrt(X)))", "fitness": 40.821, "estimated": False}}
    v = {"run": str(tmp_path), "best": {"formula": refs["ria"]["formula"], "fitness": 40.821, "generation": 0},
         "references": refs, "beats": {"sparsegpt": True, "ria": False}, "obs": True, "lead": "sparsegpt",
         "best_is_known": "ria", "export": str(tmp_path / "export.json"), "report": str(tmp_path / "report.html"),
         "heldout": None}
    lines = format_verdict(v)
    assert lines[0].startswith("verdict: the best is a known rule, ria + obs, past sparsegpt on its fitness text; "
                               "nothing bred has beaten it yet")
    assert "sparsegpt 45.6740 (-10.63%)" in lines[2] and "ria + obs 40.8210 (+0.00%)" in lines[2]
    bred = {**v, "best": {**v["best"], "formula": "mul(W, D)", "fitness": 40.0}, "best_is_known": None,
            "beats": {"sparsegpt": True, "ria": True}}
    assert format_verdict(bred)[0] == "verdict: the search found a rule past sparsegpt, ria + obs on its fitness text."
    behind = {**v, "best": {**v["best"], "fitness": 46.0}, "best_is_known": None, "beats": {"sparsegpt": False}}
    assert format_verdict(behind)[0].startswith("verdict: no rule beat SparseGPT in this run")
