"""Held-out cells: measured once, recorded as JSON, skipped on re-run; the search's held-out step."""

import json

import pytest

from prunerzero.errors import UserError
from prunerzero.evaluation import heldout as ho
from prunerzero.evaluation.heldout import (
    Cell,
    CellRunner,
    format_table,
    known_cell,
    summary,
)
from tests.conftest import local_data, tiny_model_folder


@pytest.fixture
def setup(tmp_path):
    model = tiny_model_folder(tmp_path / "model")
    data = local_data(tmp_path / "data")
    return str(model), str(data)


def test_cells_are_measured_once_and_recorded(tmp_path, setup, monkeypatch):
    model, data = setup
    common = dict(model=model, windows=2, seqlen=32, nsamples=2, calib_seqlen=32)
    cells = [known_cell(name, text=text, **common)
             for name in ("dense", "magnitude", "wanda", "ria") for text in ("wikitext2:test", "c4:validation")]
    cells.append(Cell("mine", "tree", tree="mul(W, pow(X, 0.25))", **common))
    runner = CellRunner(tmp_path / "cells", data_dir=data)
    records = runner.run(cells)
    assert len(list((tmp_path / "cells").glob("*.json"))) == len(cells)
    by = {(r["label"], r["text"]): r for r in records}
    for r in records:
        assert r["ppl"] > 1 and r["eval_windows"] == 2 and r["eval_tokens"] == 64
        json.loads((tmp_path / "cells" / f"{r['key']}.json").read_text())  # strict JSON on disk
    assert by[("wanda", "wikitext2:test")]["sparsity_actual"] == pytest.approx(0.5, abs=0.01)
    assert by[("dense", "c4:validation")]["ppl"] != by[("dense", "wikitext2:test")]["ppl"]
    # the dense number is the reference protocol's, computed here without prunerzero: test rows joined
    # with "\n\n", tokenized once, non-overlapping windows, loss averaged over windows
    import math

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref_model, tok = AutoModelForCausalLM.from_pretrained(model).eval(), AutoTokenizer.from_pretrained(model)
    with open(f"{data}/wikitext-2/wiki.test.raw", encoding="utf-8") as f:
        rows = [line if line.strip() else "" for line in f]
    ids = tok("\n\n".join(rows), return_tensors="pt").input_ids[0][:64].reshape(2, 32)
    with torch.no_grad():
        losses = [ref_model(w[None], labels=w[None]).loss.item() for w in ids]
    assert by[("dense", "wikitext2:test")]["ppl"] == pytest.approx(math.exp(sum(losses) / 2), rel=1e-5)
    # a second run measures nothing again
    calls = []
    monkeypatch.setattr(ho, "perplexity", lambda *a, **k: calls.append(1) or (1.0, 1))
    assert CellRunner(tmp_path / "cells", data_dir=data).run(cells) == records and not calls
    table = summary(records)
    assert {row["label"] for row in table["rows"]} == {"dense", "magnitude", "wanda", "ria", "mine"}
    assert "| mine `mul(W, pow(X, 0.25))` | unstructured |" in format_table(table)


def test_cell_keys_depend_on_what_the_number_depends_on():
    a = known_cell("wanda", windows=4)
    assert a.key() == known_cell("wanda", windows=4).key()
    for other in (known_cell("wanda", windows=8), known_cell("wanda", windows=4, calib_seed=1),
                  known_cell("wanda", windows=4, text="c4:validation"), known_cell("ria", windows=4)):
        assert other.key() != a.key()
    obs = Cell("wanda + obs", "tree", tree="mul(abs(W), sqrt(X))", windows=4, update="obs")
    assert obs.key() != Cell("w", "tree", tree="mul(abs(W), sqrt(X))", windows=4).key()
    assert obs.key() != Cell("w", "tree", tree="mul(abs(W), sqrt(X))", windows=4, update="obs", obs_scope="row").key()
    assert obs.pruning() != known_cell("wanda", windows=4).pruning()
    with pytest.raises(UserError, match="--update obs"):
        Cell("w", "wanda", update="obs")
    with pytest.raises(UserError, match="text: unknown 'wikitext2:validation'; did you mean 'c4:validation'"):
        known_cell("wanda", text="wikitext2:validation")
    with pytest.raises(UserError, match="baseline: unknown 'obs'"):
        known_cell("obs")


def test_a_search_ends_with_its_heldout_table(tmp_path, setup, capsys):
    import yaml

    from prunerzero.cli import main

    model, data = setup
    config = {
        "name": "r", "output_dir": str(tmp_path / "runs"), "seed": 1,
        "model": {"name": model, "device": "cpu"},
        "calibration": {"nsamples": 2, "seqlen": 32, "data_dir": data},
        "fitness": {"seqlen": 32, "windows": 2},
        "search": {"population": 6, "generations": 1, "init_max_depth": 2},
        "heldout": {"top_k": 1, "baselines": ["magnitude", "wanda"], "windows": 2, "seqlen": 32},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main(["search", "--config", str(tmp_path / "c.yaml")]) == 0
    assert "| dense | - |" in capsys.readouterr().out
    table = json.loads((tmp_path / "runs" / "r" / "heldout.json").read_text())
    labels = {row["label"] for row in table["rows"]}
    assert labels == {"dense", "magnitude", "wanda", "#1"}
    best = next(row for row in table["rows"] if row["label"] == "#1")
    state = json.loads((tmp_path / "runs" / "r" / "hall_of_fame.json").read_text())["trees"][0]
    assert best["tree"] == state["formula"] and best["fitness"] == state["fitness"]
    # the #1 cell is what `prunerzero prune` gives with the run's calibration, on the same test windows
    capsys.readouterr()
    assert main(["prune", "--model", model, "--data-dir", data, "--method", "tree", "--tree", best["tree"],
                 "--nsamples", "2", "--seqlen", "32", "--max-eval-windows", "2"]) == 0
    pruned = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert best["wikitext2:test"] == pytest.approx(pruned["ppl"], rel=1e-9) and best["c4:validation"] > 1
    # prunerzero heldout on its own: nothing measured again, another budget measured anew
    cells = set((tmp_path / "runs" / "r" / "heldout").glob("*.json"))
    assert main(["heldout", str(tmp_path / "runs" / "r")]) == 0
    assert set((tmp_path / "runs" / "r" / "heldout").glob("*.json")) == cells
    assert main(["heldout", str(tmp_path / "runs" / "r"), "--windows", "1", "--texts", "wikitext2:test"]) == 0
    assert len(set((tmp_path / "runs" / "r" / "heldout").glob("*.json"))) == len(cells) + 4
    assert main(["heldout", str(tmp_path / "runs" / "r"), "--texts", "wikitext2:validation"]) == 2
