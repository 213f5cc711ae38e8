"""Bad input and faults: one line and exit status 2, nothing a user made is lost."""

import json
import os
import random

import pytest
import yaml

from prunerzero.cli import main
from prunerzero.config import config_from_dict, load_config
from prunerzero.errors import UserError
from prunerzero.fitness.base import WORST_FITNESS
from prunerzero.fitness.reconstruction import ReconstructionEvaluator
from prunerzero.primitives.tree import Tree
from prunerzero.runs import run_search
from prunerzero.search import checkpoint as ckpt

RECON = {"seed": 3, "search": {"population": 8, "generations": 2}, "evaluator": {"type": "reconstruction"}}


def one_line_error(capsys, argv, *words):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) >= 1 and err[-1].startswith("prunerzero: error:") and "Traceback" not in "\n".join(err)
    for w in words:
        assert w in err[-1], (w, err[-1])
    return err[-1]


@pytest.fixture
def run(tmp_path):
    """A finished reconstruction search in tmp_path/runs/r, started from tmp_path/config.yaml."""
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump({"name": "r", "output_dir": str(tmp_path / "runs"), **RECON}))
    assert main(["search", "--config", str(cfg_path), "--no-heldout"]) == 0
    return tmp_path / "runs" / "r"


@pytest.mark.parametrize("name", ["..", ".", "/abs/path", "../../x", "a/b", ""])
def test_run_names_cannot_escape(tmp_path, capsys, name):
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump({"name": "ok", "output_dir": str(tmp_path), **RECON}))
    one_line_error(capsys, ["search", "--config", str(cfg_path), "--name", name], "plain folder name")
    cfg_path.write_text(yaml.safe_dump({"name": name, "output_dir": str(tmp_path), **RECON}))
    one_line_error(capsys, ["search", "--config", str(cfg_path)], "plain folder name")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]  # no folder made anywhere


def test_export_never_overwrites_the_run_or_writes_through_links(run, tmp_path, capsys):
    state = (run / ckpt.STATE).read_text()
    for target in (run / ckpt.STATE, run / ckpt.CONFIG, run / ckpt.LOG):
        one_line_error(capsys, ["export", str(run), "--out", str(target)], "run's own files")
    assert (run / ckpt.STATE).read_text() == state
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "elsewhere.json")
    one_line_error(capsys, ["export", str(run), "--out", str(link)], "symbolic link")
    one_line_error(capsys, ["export", str(run), "--out", str(tmp_path)], "is a directory")
    one_line_error(capsys, ["export", str(run), "--out", os.devnull], "not a regular file")
    for top in ("0", "-1"):
        one_line_error(capsys, ["export", str(run), "--top", top], "--top")
    assert main(["export", str(run), "--out", str(tmp_path / "best.json")]) == 0
    assert Tree.load(tmp_path / "best.json")
    assert main(["export", str(run), "--pareto", "--out", str(tmp_path / "front.json")]) == 0
    front = json.loads((tmp_path / "front.json").read_text())["trees"]
    sizes, fits = [t["size"] for t in front], [t["fitness"] for t in front]
    assert sizes == sorted(sizes) and fits == sorted(fits, reverse=True)


def test_one_search_per_folder(run):
    cfg = config_from_dict(yaml.safe_load((run / ckpt.CONFIG).read_text()))
    with ckpt.run_lock(run):
        with pytest.raises(UserError, match=rf"in use by another search \(pid {os.getpid()}\)"):
            run_search(cfg, resume=True, generations=4)


def test_resume_refuses_any_change_and_keeps_the_config_when_it_fails(run, tmp_path, capsys):
    before = (run / ckpt.CONFIG).read_text()
    other = yaml.safe_load(before)
    other["search"]["population"] = 9
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    one_line_error(capsys, ["search", "--resume", str(run), "--config", str(tmp_path / "other.yaml")],
                   "search.population: 8 -> 9")
    other["evaluator"] = {"type": "inprocess"}
    other["model"] = {"name": str(tmp_path / "no-such-model")}
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    one_line_error(capsys, ["search", "--resume", str(run), "--config", str(tmp_path / "other.yaml"), "--force",
                            "--generations", "3"], "no-such-model")
    assert (run / ckpt.CONFIG).read_text() == before
    assert main(["search", "--resume", str(run), "--generations", "3", "--no-heldout"]) == 0
    one_line_error(capsys, ["search", "--resume", str(run), "--generations", "-3"], "must not be negative")


@pytest.mark.parametrize("content,word", [
    (b"\xff\xfe garbage", "not UTF-8"), (b"\x00\x01garbage", "not valid JSON"), (b"[]", "not a JSON object"), (b'{"format": 1}', "fingerprint"),
    (b"{not json", "not valid JSON"), (b'{"a": NaN}', "not valid JSON"),
])
def test_corrupt_state_files_get_one_line(run, capsys, content, word):
    (run / ckpt.STATE).write_bytes(content)
    one_line_error(capsys, ["export", str(run)], word)


@pytest.mark.parametrize("edit,word", [
    (lambda d: d.pop("cache"), "missing key 'cache'"), (lambda d: d.update(generation=-5), "-1 or more"),
    (lambda d: d.update(population="W"), "'population' must be list"),
    (lambda d: d.update(population=["mul(W"]), "incomplete"),
    (lambda d: d["cache"].update(x={"tree": "W", "fitness": "low", "generation": 0}), "fitness' (number)"),
    (lambda d: d.update(counters={"evaluated": 1.5}), "integers"),
])
def test_mistyped_state_fields_get_one_line(run, capsys, edit, word):
    data = json.loads((run / ckpt.STATE).read_text())
    edit(data)
    (run / ckpt.STATE).write_text(json.dumps(data))
    one_line_error(capsys, ["search", "--resume", str(run), "--generations", "4"], word)


@pytest.mark.parametrize("text,word", [
    ("a: &x [1, 2]\nb: *x\n", "aliases"), ("seed: 1\nseed: 2\n", "appears twice"),
    ("seed: 1000000000000000000000000000000\n", "above the limit"), ("search:\n  population: 1000000000\n", "above the limit"),
    ("seed: -1\n", "must not be negative"), ("search: [1, 2]\n", "must be a mapping"),
    ("fitness:\n  pattern: 3:4:5\n", "pattern"), ("search:\n  constants: [0.3]\n", "unknown constant"),
])
def test_bad_configs_get_one_line_on_dry_run(tmp_path, capsys, text, word):
    (tmp_path / "c.yaml").write_text(text)
    one_line_error(capsys, ["search", "--config", str(tmp_path / "c.yaml"), "--dry-run"], word)


def test_unquoted_n_m_in_yaml_is_read_back(tmp_path):
    (tmp_path / "c.yaml").write_text("fitness:\n  pattern: 2:4\n")
    assert load_config(tmp_path / "c.yaml").fitness.pattern == "2:4"


def test_a_nan_fitness_is_the_worst_with_its_reason(tmp_path):
    class NaNEvaluator(ReconstructionEvaluator):
        def evaluate(self, trees, budget=None):
            out = super().evaluate(trees, budget)
            for r in out[::2]:
                r.fitness = float("nan")
            return out

    cfg = config_from_dict({"name": "n", "output_dir": str(tmp_path), **RECON})
    state = run_search(cfg, evaluator=NaNEvaluator())
    nan = [r for r in state.cache.values() if "not a finite number" in r.get("reason", "")]
    assert nan and all(r["fitness"] == WORST_FITNESS for r in nan)
    json.loads((cfg.run_dir / ckpt.STATE).read_text(), parse_constant=lambda c: pytest.fail(c))


def test_prune_refuses_degenerate_trees_and_bad_inputs(model_and_data, tmp_path, capsys):
    model, data = model_and_data
    base = ["prune", "--model", model, "--data-dir", data, "--nsamples", "2", "--seqlen", "32", "--max-eval-windows", "1"]
    one_line_error(capsys, base + ["--method", "tree", "--tree", "sub(W, W)"], "cannot rank the weights of model.layers.0")
    one_line_error(capsys, base + ["--method", "tree", "--tree", str(tmp_path)], "is a directory")
    one_line_error(capsys, base + ["--method", "wanda", "--device", "gpu"], "not understood")
    one_line_error(capsys, base[:-4] + ["--seqlen", "100000", "--method", "magnitude"], "fewer than one window")
    (tmp_path / "bad.json").write_bytes(b"\xff\xfe\x00")
    one_line_error(capsys, base + ["--method", "tree", "--tree", str(tmp_path / "bad.json")], "not text")
    (tmp_path / "bad.json").write_text('{"data": ["W"]}')
    one_line_error(capsys, base + ["--method", "tree", "--tree", str(tmp_path / "bad.json")], "unknown")
    (tmp_path / "bad.json").write_text('{"trees": [{"x": 1}]}')
    one_line_error(capsys, base + ["--method", "tree", "--tree", str(tmp_path / "bad.json")], "'tree' key")
    deep = "abs(" * 900 + "W" + ")" * 900
    one_line_error(capsys, base + ["--method", "tree", "--tree", deep], "levels deep")
    (tmp_path / "deep.json").write_text('{"data": "abs", "left": ' * 5000 + '{"data": "W"}' + "}" * 5000)
    one_line_error(capsys, base + ["--method", "tree", "--tree", str(tmp_path / "deep.json")], "deep")
    (tmp_path / "fake.gguf").write_bytes(b"not a gguf file at all")
    one_line_error(capsys, ["prune", "--model", str(tmp_path / "fake.gguf"), "--method", "magnitude"], "cannot load model")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    one_line_error(capsys, ["prune", "--model", str(tmp_path / "empty"), "--method", "magnitude"], "cannot load model")


def test_fuzzed_trees_configs_and_states_get_user_errors_only(run):
    rng = random.Random(0)
    words = ["mul", "add", "pow", "abs", "rown", "W", "X", "G", "0.5", "2", "0.3", "(", ")", ",", "foo", "1e9", "-"]
    for _ in range(2000):
        text = "".join(rng.choice(words) for _ in range(rng.randint(0, 12)))
        try:
            Tree.parse(text)
        except UserError:
            pass
        data = rng.choice([{"data": rng.choice(words)}, {"data": "pow", "left": {"data": "W"}, "right": {"data": rng.random()}},
                           {"data": rng.choice(words), "left": rng.choice([None, 1, "x", {"data": "W"}])}, [], "W", 3])
        try:
            Tree.from_json(data)
        except UserError:
            pass
    good = yaml.safe_load((run / ckpt.CONFIG).read_text())
    values = [None, -1, 0, 1.5, "x", [], {}, True, 10**12, float("nan"), "2:4", [0.3], ["W"]]
    for _ in range(1000):
        cfg = json.loads(json.dumps(good))
        section = rng.choice([k for k, v in cfg.items() if isinstance(v, dict)])
        if cfg[section]:
            cfg[section][rng.choice(list(cfg[section]))] = rng.choice(values)
        try:
            config_from_dict(cfg)
        except UserError:
            pass
    state = json.loads((run / ckpt.STATE).read_text())
    for _ in range(300):
        broken = json.loads(json.dumps(state))
        key = rng.choice(list(broken))
        broken[key] = rng.choice(values[:9])
        (run / ckpt.STATE).write_text(json.dumps(broken))
        try:
            ckpt.load_checkpoint(run)
        except UserError:
            pass


@pytest.mark.integration
def test_a_real_model_search_is_reproducible_across_processes(tmp_path, smollm2):
    """The same config and seed, run twice in separate processes on the real SmolLM2: the same log,
    population, cache and counters (on one machine; see docs/design.md for what can differ between
    machines)."""
    import subprocess
    import sys

    config = {
        "name": "r", "seed": 4, "model": {"name": "smollm2-135m", "device": "cpu"},
        "calibration": {"nsamples": 2, "seqlen": 128}, "fitness": {"seqlen": 128, "windows": 2,
                                                                   "multi_fidelity": {"low_windows": 1, "promote": 0.5}},
        "search": {"population": 6, "generations": 2, "init_max_depth": 2, "elites": 1},
    }
    states = []
    for run, module in (("a", "prunerzero.cli"), ("b", "prunerzero")):  # both ways of `python -m`
        (tmp_path / f"{run}.yaml").write_text(yaml.safe_dump({**config, "output_dir": str(tmp_path / run)}))
        done = subprocess.run([sys.executable, "-m", module, "search", "--config", str(tmp_path / f"{run}.yaml"),
                               "--no-heldout"], capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-2000:]
        states.append(json.loads((tmp_path / run / "r" / "state.json").read_text()))
    a, b = states
    for key in ("population", "cache", "counters"):
        assert a[key] == b[key], key
    strip = lambda log: [{k: v for k, v in row.items() if k != "seconds"} for row in log]  # noqa: E731
    assert strip(a["log"]) == strip(b["log"])


def test_seed_flag_starts_a_new_run_with_that_seed_and_cannot_change_a_runs_seed(run, tmp_path, capsys):
    cfg_path = tmp_path / "config.yaml"
    assert main(["search", "--config", str(cfg_path), "--seed", "11", "--name", "r11", "--no-heldout"]) == 0
    other = tmp_path / "runs" / "r11"
    assert yaml.safe_load((other / ckpt.CONFIG).read_text())["seed"] == 11
    assert yaml.safe_load((run / ckpt.CONFIG).read_text())["seed"] == 3
    population = [json.dumps(t) for t in json.loads((other / ckpt.STATE).read_text())["population"]]
    assert population != [json.dumps(t) for t in json.loads((run / ckpt.STATE).read_text())["population"]]
    state = (run / ckpt.STATE).read_text()
    one_line_error(capsys, ["search", "--resume", str(run), "--seed", "4"], "cannot change a run's seed", "--name")
    one_line_error(capsys, ["search", "--config", str(cfg_path), "--seed", "-1", "--name", "neg"], "--seed")
    assert (run / ckpt.STATE).read_text() == state and not (tmp_path / "runs" / "neg").exists()


def test_patience_flag_sets_the_stop_on_a_resume_and_refuses_nonsense(run, capsys):
    before = (run / ckpt.STATE).read_text()
    state = json.loads(before)
    one_line_error(capsys, ["search", "--resume", str(run), "--patience", "0"], "--patience must be at least 1")
    assert (run / ckpt.STATE).read_text() == before
    # a stop setting, not a change of the search: accepted on resume without --force, kept in the run's config
    assert main(["search", "--resume", str(run), "--patience", "1", "--generations", str(state["generation"] + 1),
                 "--no-heldout"]) == 0
    assert yaml.safe_load((run / ckpt.CONFIG).read_text())["search"]["patience"] == 1
