"""Zero-shot evaluation: task checks, local copies of the seven lm-eval tasks, a tiny-model run."""

from __future__ import annotations

import json

import pytest
import torch

from prunerzero import data as data_mod
from prunerzero.errors import UserError
from prunerzero.evaluation import zeroshot
from prunerzero.evaluation.zeroshot import (
    KNOWN_TASKS,
    build_task,
    check_tasks,
    evaluate_zeroshot,
    format_table,
    local_docs,
    split_hellaswag_ctx,
)

# Rows of the split each stock lm-eval task evaluates on.
EXPECTED_DOCS = {
    "boolq": 3270,
    "rte": 277,
    "hellaswag": 10042,
    "winogrande": 1267,
    "arc_easy": 2376,
    "arc_challenge": 1172,
    "openbookqa": 500,
}


def have_local(name: str) -> bool:
    return data_mod.find_data_file(zeroshot._TASKS[name].local) is not None


def _require_data(fn):
    """The shared zero-shot files are a prerequisite: their absence fails loudly, it is not skipped."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        missing = [t for t in KNOWN_TASKS if not have_local(t)]
        if missing:
            pytest.fail(f"zero-shot data missing for {', '.join(missing)}; set PRUNERZERO_DATA to the shared data folder")
        return fn(*args, **kwargs)

    return wrapper


needs_data = _require_data


@pytest.fixture()
def no_data_no_hub(tmp_path, monkeypatch):
    """Data roots that hold nothing and a hub that is switched off."""
    monkeypatch.setattr(data_mod, "data_roots", lambda configured=None: [tmp_path])
    monkeypatch.setattr(zeroshot, "data_roots", lambda configured=None: [tmp_path])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


# ---------------------------------------------------------------- check_tasks


def test_known_tasks_are_the_seven():
    assert KNOWN_TASKS == ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
    assert set(zeroshot._TASKS) == set(KNOWN_TASKS)


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(UserError) as e:
        check_tasks(["boolq", "piqa"], None)
    msg = str(e.value)
    assert "'piqa'" in msg and "\n" not in msg
    assert all(t in msg for t in KNOWN_TASKS)


def test_missing_file_names_the_expected_file(no_data_no_hub):
    with pytest.raises(UserError) as e:
        check_tasks(["rte"], str(no_data_no_hub))
    msg = str(e.value)
    assert "zeroshot/rte/val.jsonl" in msg and str(no_data_no_hub) in msg
    assert "hub" in msg and "\n" not in msg


def test_missing_file_with_reachable_hub_uses_the_stock_dataset(no_data_no_hub, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    for var in ("HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(zeroshot, "_hub_probe", lambda path: None)  # pretend the hub answers
    check_tasks(["boolq"], None)
    cfg, source = zeroshot._task_config("boolq", None)
    assert source == "hub:aps/super_glue" and "custom_dataset" not in cfg


@needs_data
def test_local_files_win_over_the_hub(monkeypatch):
    monkeypatch.setattr(zeroshot, "_hub_probe", lambda path: pytest.fail("the hub must not be asked"))
    check_tasks(list(KNOWN_TASKS), None)
    cfg, source = zeroshot._task_config("arc_easy", None)
    assert source.startswith("local:") and source.endswith("ARC-Easy-Test.jsonl")
    assert cfg["test_split"] == "test" and cfg["training_split"] is None and cfg["validation_split"] is None


# ---------------------------------------------------------------- local documents


@needs_data
@pytest.mark.parametrize("name", KNOWN_TASKS)
def test_local_docs_count(name):
    assert len(local_docs(name)) == EXPECTED_DOCS[name]


@needs_data
def test_stock_prompts_on_local_docs():
    boolq = build_task("boolq")
    doc = boolq.eval_docs[0]
    assert boolq.doc_to_text(doc) == f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:"
    assert boolq.doc_to_choice(doc) == ["no", "yes"] and boolq.doc_to_target(doc) == 0  # "false"

    rte = build_task("rte")  # the stock `rte` is GLUE's: True = entailment (label 0)
    doc = rte.eval_docs[0]
    assert rte.doc_to_text(doc) == (
        "Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44, according to "
        "the Christopher Reeve Foundation.\nQuestion: Christopher Reeve had an accident. True or False?\nAnswer:"
    )
    assert rte.doc_to_choice(doc) == ["True", "False"] and rte.doc_to_target(doc) == 1  # not_entailment

    arc = build_task("arc_easy")
    doc = arc.eval_docs[0]
    assert arc.doc_to_text(doc) == (
        "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:"
    )
    assert arc.doc_to_choice(doc)[0] == "Sunlight is the source of energy for nearly all ecosystems."
    assert arc.doc_to_target(doc) == 0
    assert [m["metric"] for m in arc.config.metric_list] == ["acc", "acc_norm"]

    obqa = build_task("openbookqa")
    doc = obqa.eval_docs[0]
    assert obqa.doc_to_text(doc).endswith("they decide the best way to save money is to")
    assert obqa.doc_to_choice(doc) == [
        "make more phone calls", "quit eating lunch out", "buy less with monopoly money", "have lunch with friends",
    ]
    assert obqa.doc_to_target(doc) == 1

    wino = build_task("winogrande")  # partial scoring: the context varies, the continuation is fixed
    doc = wino.eval_docs[0]
    assert wino.doc_to_text(doc) == 1
    assert wino.doc_to_choice(doc) == [
        "Sarah was a much better surgeon than Maria so Sarah", "Sarah was a much better surgeon than Maria so Maria",
    ]
    assert wino.doc_to_target(doc) == "always got the easier cases."
    assert all(t.config.output_type == "multiple_choice" for t in (boolq, rte, arc, obqa, wino))


@needs_data
def test_hellaswag_prompt_is_rebuilt_as_lm_eval_builds_it():
    task = build_task("hellaswag")
    doc = task.eval_docs[0]
    assert task.doc_to_text(doc) == "Roof shingle removal: A man is sitting on a roof. He"
    assert task.doc_to_choice(doc)[3] == "starts pulling up roofing on a roof."
    assert task.doc_to_target(doc) == 3
    assert [m["metric"] for m in task.config.metric_list] == ["acc", "acc_norm"]


def test_split_hellaswag_ctx():
    assert split_hellaswag_ctx("A man is sitting on a roof. he") == ("A man is sitting on a roof.", "he")
    assert split_hellaswag_ctx("A lady walks. She bends down. the lady") == ("A lady walks. She bends down.", "the lady")
    # WikiHow: the context ends in a whole sentence, ctx_b is empty.
    assert split_hellaswag_ctx("How to x. Do this first. Then do that.") == ("How to x. Do this first. Then do that.", "")
    assert split_hellaswag_ctx("no sentence end here") == ("no sentence end here", "")
    assert split_hellaswag_ctx('A logo appears. " knife sharpening') == ("A logo appears.", '" knife sharpening')


@needs_data
def test_openbookqa_answers_agree_with_the_mosaicml_copy():
    path = data_mod.find_data_file("zeroshot/openbookqa/openbook_qa.jsonl")
    if path is None:
        pytest.fail("zeroshot/openbookqa/openbook_qa.jsonl missing; set PRUNERZERO_DATA to the shared data folder")
    docs = local_docs("openbookqa")
    with open(path, encoding="utf-8") as f:
        mosaic = [json.loads(line) for line in f]
    assert [d["choices"]["text"] for d in docs] == [m["choices"] for m in mosaic]
    assert ["ABCD".index(d["answerKey"]) for d in docs] == [m["gold"] for m in mosaic]


# ---------------------------------------------------------------- evaluation on a tiny model


@pytest.fixture(scope="session")
def tokenizer():
    """The SmolLM2 tokenizer: from the converted-model cache, else from the GGUF file."""
    from transformers import AutoTokenizer

    from prunerzero.models import cache_dir, resolve_model

    try:
        source = resolve_model("smollm2-135m")
    except UserError as e:
        pytest.fail(str(e))
    converted = cache_dir() / "models" / f"{source.gguf_file.rsplit('.', 1)[0]}-{source.fingerprint}"
    if (converted / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(converted))
    return AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
    )
    return LlamaForCausalLM(config).eval()


@needs_data
def test_evaluate_zeroshot_tiny_model(tiny_model, tokenizer):
    result = evaluate_zeroshot(tiny_model, tokenizer, ["rte", "arc_challenge", "winogrande"], limit=4, batch_size=4)
    tasks = result["tasks"]
    assert list(tasks) == ["rte", "arc_challenge", "winogrande"]
    for name, entry in tasks.items():
        assert entry["n"] == 4
        assert 0.0 <= entry["acc"] <= 1.0
        assert entry["source"].startswith("local:")
    assert 0.0 <= tasks["arc_challenge"]["acc_norm"] <= 1.0
    assert "acc_norm" not in tasks["rte"] and "acc_norm" not in tasks["winogrande"]
    assert result["mean_acc"] == pytest.approx(sum(e["acc"] for e in tasks.values()) / 3)
    assert not tiny_model.training

    table = format_table(result)
    lines = table.splitlines()
    assert lines[0] == "| task | n | acc | acc_norm |" and len(lines) == 2 + 3 + 1
    assert lines[3].startswith("| arc_challenge | 4 | ") and lines[2].endswith("| - |")
    assert lines[-1].startswith("| mean |")
