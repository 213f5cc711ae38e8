"""The output rule: no command writes over a run's files, through a link, onto a folder, or into a
model folder without --force; OS errors are one line; the test split never calibrates or selects;
held-out records are checked before they are trusted; a resume checks its checkpoint."""

import errno
import hashlib
import json
import os
import random
import stat
import time

import pytest
import yaml

from prunerzero import files
from prunerzero.cli import main
from prunerzero.evaluation.heldout import CellRunner, known_cell
from prunerzero.search import checkpoint as ckpt

RECON = {"seed": 3, "search": {"population": 8, "generations": 2}, "evaluator": {"type": "reconstruction"}}


def one_line_error(capsys, argv, *words, status=2):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == status, (rc, err)
    assert err and err[-1].startswith("prunerzero: error:") and "Traceback" not in "\n".join(err), err
    for w in words:
        assert w in err[-1], (w, err[-1])
    return err[-1]


def make_run(root, name, population=8, seed=3):
    cfg = root / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump({**RECON, "name": name, "output_dir": str(root / "runs"), "seed": seed,
                                   "search": {"population": population, "generations": 2}}))
    assert main(["search", "--config", str(cfg), "--no-heldout"]) == 0
    return root / "runs" / name


def snapshot(*folders):
    """Every file under the folders with its bytes' hash and mode."""
    out = {}
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                out[str(p)] = (hashlib.sha256(p.read_bytes()).hexdigest(), stat.S_IMODE(p.stat().st_mode))
    return out


@pytest.fixture
def runs(tmp_path):
    return make_run(tmp_path, "a"), make_run(tmp_path, "b", population=10, seed=4)


def prune_args(model_and_data, *more):
    model, data = model_and_data
    return ["prune", "--model", model, "--data-dir", data, "--nsamples", "2", "--seqlen", "32",
            "--max-eval-windows", "1", "--method", "magnitude", *more]


# 1. Nothing a user made is overwritten ------------------------------------------------------------

def test_report_and_export_never_write_over_a_runs_files(runs, tmp_path, capsys):
    a, b = runs
    before = snapshot(a, b)
    for target in (a / ckpt.STATE, a / ckpt.HALL_OF_FAME, b / ckpt.STATE, b / ckpt.CONFIG):
        one_line_error(capsys, ["report", str(a), "--out", str(target)], "run's own files")
    for target in (b / ckpt.STATE, b / ckpt.CONFIG, a / "environment.json", b / "environment.json", b / "export.json"):
        if target.name == "export.json":
            assert main(["export", str(b)]) == 0  # b's own export, then no other run's command may replace it
            before = snapshot(a, b)
        one_line_error(capsys, ["export", str(a), "--out", str(target)], "run's own files")
    assert snapshot(a, b) == before
    # what each command writes into its own run stays writable, again and again
    for _ in range(2):
        assert main(["report", str(a)]) == 0 and main(["export", str(a), "--tree-files"]) == 0
    assert (a / "report.html").is_file() and (a / "export-rank1.json").is_file()


def test_prune_checks_every_output_before_it_loads_anything(runs, model_and_data, tmp_path, capsys, monkeypatch):
    a, _ = runs
    before = snapshot(a)
    import prunerzero.cli.prune as prune_cli

    def no_load(*_a, **_k):
        raise AssertionError("the model was loaded before the outputs were checked")

    monkeypatch.setattr(prune_cli, "load_model", no_load)
    one_line_error(capsys, prune_args(model_and_data, "--json", str(a / ckpt.STATE)), "run's own files")
    one_line_error(capsys, prune_args(model_and_data, "--allocation", "uniform", "--save-allocation",
                                      str(a / ckpt.LOG)), "run's own files")
    (tmp_path / "a_file").write_text("mine")
    one_line_error(capsys, prune_args(model_and_data, "--json", str(tmp_path / "a_file" / "x.json")),
                   "is a file, not a folder")
    one_line_error(capsys, prune_args(model_and_data, "--save-model", str(tmp_path / "a_file")),
                   "is a file, not a folder")
    one_line_error(capsys, prune_args(model_and_data, "--save-model", str(a)), "run's folder")
    (tmp_path / "model_out").mkdir()
    (tmp_path / "model_out" / "notes.txt").write_text("mine")
    one_line_error(capsys, prune_args(model_and_data, "--save-model", str(tmp_path / "model_out")), "--force")
    one_line_error(capsys, prune_args(model_and_data, "--json", str(tmp_path / "same.json"), "--allocation", "uniform",
                                      "--save-allocation", str(tmp_path / "same.json")), "same file")
    assert snapshot(a) == before and (tmp_path / "a_file").read_text() == "mine"
    monkeypatch.undo()
    assert main(prune_args(model_and_data, "--save-model", str(tmp_path / "model_out"), "--force", "--no-eval")) == 0
    assert (tmp_path / "model_out" / "config.json").is_file() and (tmp_path / "model_out" / "notes.txt").is_file()


def test_gradients_and_finetune_check_their_outputs_first(runs, model_and_data, tmp_path, capsys):
    a, _ = runs
    model, data = model_and_data
    before = snapshot(a)
    grads = ["gradients", "--model", model, "--data-dir", data, "--nsamples", "2", "--seqlen", "32", "--out"]
    one_line_error(capsys, grads + [str(a / ckpt.STATE)], "run's own files")
    (tmp_path / "folder").mkdir()
    one_line_error(capsys, grads + [str(tmp_path / "folder")], "is a directory")
    assert list((tmp_path / "folder").iterdir()) == [] and not list(tmp_path.glob(".*tmp*"))
    (tmp_path / "a_file").write_text("mine")
    tune = ["finetune", "--model", model, "--data-dir", data, "--steps", "1", "--seqlen", "32",
            "--eval-seqlen", "32", "--max-eval-windows", "1"]
    one_line_error(capsys, tune + ["--save", str(tmp_path / "a_file")], "is a file, not a folder")
    one_line_error(capsys, tune + ["--json", str(a / ckpt.LOG)], "run's own files")
    assert snapshot(a) == before and (tmp_path / "a_file").read_text() == "mine"


def test_a_search_never_writes_into_a_folder_that_is_not_a_run(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**RECON, "name": "mine", "output_dir": str(tmp_path / "runs")}))
    mine = tmp_path / "runs" / "mine"
    mine.mkdir(parents=True)
    (mine / "log.jsonl").write_text("my notes\n")
    (mine / "fitness.png").write_bytes(b"my picture")
    before = snapshot(mine)
    for extra in ([], ["--dry-run"]):
        one_line_error(capsys, ["search", "--config", str(cfg), *extra], "is not a search run")
    assert snapshot(mine) == before and sorted(p.name for p in mine.iterdir()) == ["fitness.png", "log.jsonl"]
    (tmp_path / "runs" / "plain").write_text("a file")
    one_line_error(capsys, ["search", "--config", str(cfg), "--name", "plain"], "is a file")
    one_line_error(capsys, ["search", "--config", str(cfg), "--name", "x", "--output-dir", str(tmp_path / "c.yaml")],
                   "is a file, not a folder")
    assert (tmp_path / "runs" / "plain").read_text() == "a file"



def test_a_start_stopped_before_its_first_checkpoint_can_be_started_again(tmp_path):
    """Statistics a stopped start computed (X, G, the OBS factors) stay and are reused; anything else blocks."""
    from prunerzero.errors import UserError
    from prunerzero.runs import check_run_folder
    run = tmp_path / "runs" / "stopped"
    run.mkdir(parents=True)
    for name in ("config.yaml", "environment.json", "activations-0a.safetensors", "gradients-1b.safetensors",
                 "obs-factors-2c.safetensors"):
        (run / name).write_bytes(b"x")
    check_run_folder(run, resume=False)
    (run / "factors.safetensors").write_bytes(b"mine")
    with pytest.raises(UserError, match="factors.safetensors"):
        check_run_folder(run, resume=False)

# 2. OS errors are one line, and leave no temporary file -------------------------------------------

@pytest.mark.parametrize("code,status,word", [(errno.ENOSPC, 1, "no space left"), (errno.EACCES, 2, "permission denied"),
                                              (errno.EROFS, 2, "read-only")])
def test_os_errors_while_writing_are_one_line_and_leave_nothing(runs, tmp_path, capsys, monkeypatch, code, status, word):
    a, _ = runs
    out = tmp_path / "best.json"
    out.write_text("previous")

    def failing_fsync(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(files.os, "fsync", failing_fsync)
    one_line_error(capsys, ["export", str(a), "--out", str(out)], word, str(out), status=status)
    assert out.read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_files_keep_the_mode_open_would_give_them(runs, tmp_path):
    a, _ = runs
    old = os.umask(0o022)
    try:
        assert main(["export", str(a), "--out", str(tmp_path / "new.json")]) == 0
        assert stat.S_IMODE((tmp_path / "new.json").stat().st_mode) == 0o644
        (tmp_path / "shared.json").write_text("x")
        os.chmod(tmp_path / "shared.json", 0o664)
        assert main(["export", str(a), "--out", str(tmp_path / "shared.json")]) == 0
        assert stat.S_IMODE((tmp_path / "shared.json").stat().st_mode) == 0o664
    finally:
        os.umask(old)


# 3. Test text never calibrates or selects ---------------------------------------------------------

@pytest.mark.parametrize("section,value", [("calibration", {"split": "test"}), ("calibration", {"split": "Test"}),
                                           ("fitness", {"split": "Test"}), ("fitness", {"split": "TEST"}),
                                           ("calibration", {"source": "c4", "split": "validation"})])
def test_the_test_split_is_refused_for_calibration_and_fitness_at_dry_run(tmp_path, capsys, section, value):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**RECON, "output_dir": str(tmp_path), section: value}))
    one_line_error(capsys, ["search", "--config", str(cfg), "--dry-run"], "held out")
    assert not (tmp_path / "smollm2-135m").exists()


def test_a_split_spelled_otherwise_is_named_at_dry_run(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**RECON, "output_dir": str(tmp_path), "fitness": {"split": "Validation"}}))
    one_line_error(capsys, ["search", "--config", str(cfg), "--dry-run"], "not 'Validation'")


def test_prune_and_gradients_refuse_the_test_file_as_calibration(model_and_data, tmp_path, capsys):
    model, data = model_and_data
    test_file = os.path.join(data, "wikitext-2", "wiki.test.raw")
    one_line_error(capsys, prune_args(model_and_data, "--calib-data", test_file), "held out")
    one_line_error(capsys, ["gradients", "--model", model, "--data-dir", data, "--calib-data", test_file,
                            "--nsamples", "2", "--seqlen", "32", "--out", str(tmp_path / "g.safetensors")], "held out")
    assert not (tmp_path / "g.safetensors").exists()


def test_more_calibration_tokens_than_the_text_holds_are_refused_before_pruning(model_and_data, capsys):
    one_line_error(capsys, prune_args(model_and_data)[:-2] + ["--nsamples", "100000", "--method", "wanda"],
                   "use at most --nsamples")


# 4. Held-out records are checked before they are trusted ------------------------------------------

def test_bad_heldout_records_are_measured_again(model_and_data, tmp_path, caplog):
    model, data = model_and_data
    common = dict(model=model, windows=1, seqlen=32, nsamples=2, calib_seqlen=32)
    magnitude, wanda = known_cell("magnitude", **common), known_cell("wanda", **common)
    runner = CellRunner(tmp_path / "cells", data_dir=data)
    good = {r["label"]: r for r in runner.run([magnitude, wanda])}
    path = runner.record_path(magnitude)
    other = runner.record_path(wanda).read_text()
    for content in ("{}", "[]", json.dumps({**good["magnitude"], "ppl": "abc"}),
                    json.dumps({**good["magnitude"], "ppl": -1.0}), other,
                    json.dumps({**json.loads(other), "key": magnitude.key()}), "{broken"):
        path.write_text(content)
        caplog.clear()
        assert runner.done(magnitude) is None
        assert "measuring the cell again" in caplog.text
        record = runner.run([magnitude])[0]
        assert record["method"] == "magnitude" and record["ppl"] == good["magnitude"]["ppl"]
    assert runner.done(wanda) == good["wanda"]
    # a record written before a field existed is still this cell's when the cell has the field's default
    older = {k: v for k, v in good["wanda"].items() if k not in ("update", "obs_scope")}
    runner.record_path(wanda).write_text(json.dumps(older))
    assert runner.done(wanda) == older


# 5. A resume checks that the checkpoint belongs to the run ----------------------------------------

def test_a_checkpoint_from_another_run_is_refused(runs, capsys):
    a, b = runs
    (a / ckpt.STATE).write_bytes((b / ckpt.STATE).read_bytes())
    before = snapshot(a)
    one_line_error(capsys, ["search", "--resume", str(a), "--generations", "3"], "population of 10",
                   "search.population: 8")
    assert snapshot(a) == before


# 6. Empty configs, labels, reconstruction runs ----------------------------------------------------

@pytest.mark.parametrize("text", ["", "false\n", "[]\n", "{}\n", "# only a comment\n"])
def test_an_empty_or_non_mapping_config_is_refused(tmp_path, capsys, text):
    (tmp_path / "c.yaml").write_text(text)
    one_line_error(capsys, ["search", "--config", str(tmp_path / "c.yaml"), "--dry-run"], "empty or not a mapping")


def test_a_reconstruction_run_says_what_its_fitness_is_and_has_no_heldout(runs, tmp_path, capsys):
    a, _ = runs
    for data in (json.loads((a / ckpt.HALL_OF_FAME).read_text()),):
        assert "perplexity" not in data["fitness"].replace("not a perplexity", "") and "reconstruction" in data["fitness"]
    for extra in ([], ["--pareto"]):
        assert main(["export", str(a), "--out", str(tmp_path / "e.json"), *extra]) == 0
        assert "reconstruction" in json.loads((tmp_path / "e.json").read_text())["fitness"]
    one_line_error(capsys, ["heldout", str(a)], "reconstruction evaluator")


# 7. The command line, fuzzed end to end -----------------------------------------------------------

def test_fuzzed_command_lines_give_one_line_errors_and_leave_other_runs_alone(runs, model_and_data, tmp_path, capsys):
    a, b = runs
    model, data = model_and_data
    (tmp_path / "a_file").write_text("mine")
    (tmp_path / "folder").mkdir()
    (tmp_path / "full_model").mkdir()
    (tmp_path / "full_model" / "weights.bin").write_bytes(b"mine")
    (tmp_path / "link.json").symlink_to(tmp_path / "nowhere.json")
    outputs = [str(p) for p in (a / ckpt.STATE, a / ckpt.CONFIG, a / ckpt.LOG, a / ckpt.HALL_OF_FAME, a / "environment.json",
                                b / ckpt.STATE, b / "fitness.png", b / "report.html", a / "new.json", tmp_path / "a_file",
                                tmp_path / "a_file" / "x.json", tmp_path / "folder", tmp_path / "link.json",
                                tmp_path / "full_model", os.devnull, tmp_path / "fresh.json", tmp_path / "fresh_model")]
    model_flags = ["--model", model, "--data-dir", data, "--nsamples", "2", "--seqlen", "32"]
    commands = {
        "export": lambda r, o: ["export", str(r), "--out", o] + rng.choice([[], ["--pareto"], ["--tree-files"], ["--top", "0"]]),
        "report": lambda r, o: ["report", str(r), "--out", o],
        "heldout": lambda r, o: ["heldout", str(r)],
        "allocate": lambda r, o: ["allocate", str(r), "--sparsity", "0.5", "--out", o],
        "prune": lambda r, o: ["prune", *model_flags, "--no-eval", "--method", rng.choice(["magnitude", "wanda", "tree"]),
                               rng.choice(["--json", "--save-model", "--save-allocation"]), o]
                              + rng.choice([[], ["--force"], ["--allocation", "uniform"], ["--calib-data", "Test"]]),
        "gradients": lambda r, o: ["gradients", *model_flags, "--out", o],
        "search": lambda r, o: ["search", "--config", str(tmp_path / rng.choice(["a.yaml", "b.yaml", "a_file"])),
                                "--name", rng.choice(["a", "b", "new", "a_file", "folder"]), "--output-dir",
                                rng.choice([str(a.parent), str(tmp_path), o]), "--dry-run"],
    }
    rng = random.Random(0)
    start, ran = time.perf_counter(), 0
    codes = []
    while ran < 200 and time.perf_counter() - start < 40:
        name = rng.choice(sorted(commands))
        own = rng.choice([a, b])
        argv = commands[name](own, rng.choice(outputs))
        before = snapshot(a, b)
        rc = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc in (0, 1, 2), (argv, rc, err)
        assert "Traceback" not in "\n".join(err), (argv, err)
        if rc:
            assert err and err[-1].startswith("prunerzero: error:"), (argv, err)
        after = snapshot(a, b)
        changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
        allowed = str(own) if name in ("export", "report") and rc == 0 else None
        assert all(allowed and p.startswith(allowed + os.sep) for p in changed), (argv, changed)
        assert (tmp_path / "full_model" / "weights.bin").read_bytes() == b"mine"
        assert (tmp_path / "a_file").is_file() and not (tmp_path / "nowhere.json").exists()  # no write through the link
        codes.append((name, rc))
        ran += 1
    assert ran >= 50
    assert {n for n, rc in codes if rc == 0} >= {"export", "report", "prune"}, codes  # the fuzz reaches real work too
