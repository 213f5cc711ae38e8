"""Zero-shot accuracy on the seven standard tasks, with lm-evaluation-harness used as a library.

The tasks are the stock lm-eval tasks. For each one the stock YAML config is read from the
installed ``lm_eval/tasks`` folder, with its own ``!function`` hooks (hellaswag ``process_docs``,
winogrande partial scoring), so prompts (``doc_to_text``), choices, targets, output type and
metrics are those of the harness itself, not a copy. Only where the documents come from changes:
when the task's local file is found (a ``--data-dir``, ``$PRUNERZERO_DATA``, ``../shared/data``,
see :func:`prunerzero.data.find_data_file`), the config gets a ``custom_dataset`` that
converts the file, in memory, to the rows of the hub dataset the stock task loads; otherwise the
stock task loads its dataset from the hub, and if the hub cannot be reached either,
:func:`check_tasks` says which file it expected where.

=============  =========================  ===================================================
task           stock lm-eval task (YAML)  local file (under ``zeroshot/``) -> hub rows
=============  =========================  ===================================================
boolq          super_glue/boolq           boolq/val.jsonl (SuperGLUE) -> aps/super_glue boolq
                                          validation; label true/false -> 1/0
rte            glue/rte (the task called  rte/val.jsonl (SuperGLUE RTE, the same 277 pairs as
               ``rte``; ``sglue_rte``     GLUE RTE validation) -> nyu-mll/glue rte: premise ->
               is the SuperGLUE one)      sentence1, hypothesis -> sentence2, entailment -> 0,
                                          not_entailment -> 1
hellaswag      hellaswag                  hellaswag/hellaswag_val_full.txt.bz2 -> Rowan/hellaswag
                                          validation (see below)
winogrande     winogrande (winogrande_xl) winogrande/hf_winogrande_xl_validation (a
                                          ``save_to_disk`` of exactly the hub rows)
arc_easy       arc/arc_easy               arc_easy/ARC-Easy-Test.jsonl (AI2 release) ->
                                          allenai/ai2_arc ARC-Easy test
arc_challenge  arc/arc_challenge          arc_challenge/ARC-Challenge-Test.jsonl -> ARC-Challenge
                                          test
openbookqa     openbookqa                 openbookqa/test.tsv (AI2 release) -> allenai/openbookqa
                                          main test; "(A) .. (B) .." split into choices
=============  =========================  ===================================================

Each task is evaluated on the split the stock task evaluates on (test for ARC and OpenBookQA,
validation for the others); training splits are not loaded (zero-shot needs none). ``limit``
takes the first N documents, as ``lm_eval --limit`` does.

HellaSwag differs slightly from the stock task. The hub rows carry ``ctx_a`` and ``ctx_b``; the
stock ``process_docs`` builds the query as ``activity_label + ": " + ctx_a + " " +
ctx_b.capitalize()`` and strips WikiHow ``[tags]``. The local file (llama.cpp's extraction of
``hellaswag_val.jsonl``) keeps only ``activity_label: ctx`` with the tags already stripped, where
``ctx = ctx_a + " " + ctx_b`` and ``ctx_b`` is lower-case. ``ctx_a``/``ctx_b`` are rebuilt by
splitting ``ctx`` after its last sentence end (``.``, ``!``, ``?``): the rest becomes ``ctx_b``
when its first letter is lower-case (ActivityNet items: "A man is sitting on a roof. he" ->
"... roof. He"), else ``ctx_b`` is empty (WikiHow items, whose ``ctx_b`` is usually empty). The
stock ``process_docs`` then runs unchanged on the rebuilt rows. Where the split guesses wrong, a
query differs from the stock one in the case of a few letters of its last sentence; tag
stripping and whitespace can differ in rare corner cases (llama.cpp removes only
[header]/[step]/[substeps]/[title], lm-eval any [..]; lm-eval's pass then runs on top). Gold
labels and endings are unchanged, so numbers are close to, not guaranteed equal to, the stock
task's.
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import functools
import json
import logging
import math
import os
import re
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from prunerzero.data import data_roots, find_data_file
from prunerzero.errors import UserError

log = logging.getLogger(__name__)

KNOWN_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")


# ---------------------------------------------------------------- local files -> hub rows


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _boolq_rows(path: Path) -> list[dict[str, Any]]:
    # aps/super_glue boolq: question, passage, idx, label (ClassLabel False=0, True=1).
    rows = []
    for r in _read_jsonl(path):
        label = r["label"]
        label = int(label.strip().lower() == "true") if isinstance(label, str) else int(bool(label))
        rows.append({"question": r["question"], "passage": r["passage"], "idx": int(r["idx"]), "label": label})
    return rows


def _rte_rows(path: Path) -> list[dict[str, Any]]:
    # nyu-mll/glue rte: sentence1, sentence2, label (entailment=0, not_entailment=1), idx.
    labels = {"entailment": 0, "not_entailment": 1}
    return [
        {"sentence1": r["premise"], "sentence2": r["hypothesis"], "label": labels[r["label"]], "idx": int(r["idx"])}
        for r in _read_jsonl(path)
    ]


def _arc_rows(path: Path) -> list[dict[str, Any]]:
    # allenai/ai2_arc: id, question, choices {text, label}, answerKey.
    rows = []
    for r in _read_jsonl(path):
        choices = r["question"]["choices"]
        rows.append({
            "id": r["id"],
            "question": r["question"]["stem"],
            "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
            "answerKey": r["answerKey"],
        })
    return rows


_OBQA_CHOICE = re.compile(r"(?:^| )\(([A-D])\) ")


def _openbookqa_rows(path: Path) -> list[dict[str, Any]]:
    # allenai/openbookqa main: id, question_stem, choices {text, label}, answerKey.
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        for r in reader:
            parts = _OBQA_CHOICE.split(r["Choices"])
            labels, texts = parts[1::2], parts[2::2]
            if parts[0] or labels != ["A", "B", "C", "D"]:
                raise UserError(f"{path}: cannot split the choices of question {r['ID']}: {r['Choices']!r}")
            rows.append({
                "id": r["ID"],
                "question_stem": r["Question Stem"],
                "choices": {"text": texts, "label": labels},
                "answerKey": r["Answer Key"],
            })
    return rows


# A sentence end: . ! or ? with any closing quotes/brackets, then white space.
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+")


def split_hellaswag_ctx(ctx: str) -> tuple[str, str]:
    """Rebuild (ctx_a, ctx_b) from ``ctx = ctx_a + " " + ctx_b`` (see the module docstring)."""
    ends = list(_SENTENCE_END.finditer(ctx))
    if ends:
        tail = ctx[ends[-1].end() :]
        first_letter = next((c for c in tail if c.isalpha()), "")
        if first_letter.islower():
            return ctx[: ends[-1].end()].rstrip(), tail
    return ctx, ""


def _hellaswag_rows(path: Path) -> list[dict[str, Any]]:
    # Rowan/hellaswag: ind, activity_label, ctx_a, ctx_b, ctx, endings, source_id, split,
    # split_type, label (a string "0".."3"). The text file has 6 lines per item.
    with bz2.open(path, "rt", encoding="utf-8") if path.suffix == ".bz2" else open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    while lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise UserError(f"{path}: expected 6 lines per HellaSwag item, got {len(lines)} lines")
    rows = []
    for i in range(0, len(lines), 6):
        head, gold, endings = lines[i], lines[i + 1].strip(), lines[i + 2 : i + 6]
        activity_label, sep, ctx = head.partition(": ")
        if not sep or gold not in ("0", "1", "2", "3"):
            raise UserError(f"{path}: line {i + 1} is not 'activity_label: context' followed by a label 0-3")
        ctx_a, ctx_b = split_hellaswag_ctx(ctx)
        rows.append({
            "ind": i // 6, "activity_label": activity_label, "ctx_a": ctx_a, "ctx_b": ctx_b,
            "ctx": ctx, "endings": endings, "source_id": "", "split": "val", "split_type": "", "label": gold,
        })
    return rows


def _winogrande_rows(path: Path) -> Any:
    # A `save_to_disk` of allenai/winogrande winogrande_xl validation: sentence, option1, option2, answer.
    import datasets

    return datasets.load_from_disk(str(path.parent))


@dataclass(frozen=True)
class _Task:
    stock_yaml: str  # relative to the installed lm_eval/tasks folder
    local: str  # relative to a data root
    split: str  # the split the stock task evaluates on
    rows: Callable[[Path], Any]


_TASKS: dict[str, _Task] = {
    "boolq": _Task("super_glue/boolq/default.yaml", "zeroshot/boolq/val.jsonl", "validation", _boolq_rows),
    "rte": _Task("glue/rte/default.yaml", "zeroshot/rte/val.jsonl", "validation", _rte_rows),
    "hellaswag": _Task("hellaswag/hellaswag.yaml", "zeroshot/hellaswag/hellaswag_val_full.txt.bz2", "validation",
                       _hellaswag_rows),
    "winogrande": _Task("winogrande/default.yaml",
                        "zeroshot/winogrande/hf_winogrande_xl_validation/data-00000-of-00001.arrow", "validation",
                        _winogrande_rows),
    "arc_easy": _Task("arc/arc_easy.yaml", "zeroshot/arc_easy/ARC-Easy-Test.jsonl", "test", _arc_rows),
    "arc_challenge": _Task("arc/arc_challenge.yaml", "zeroshot/arc_challenge/ARC-Challenge-Test.jsonl", "test",
                           _arc_rows),
    "openbookqa": _Task("openbookqa/openbookqa.yaml", "zeroshot/openbookqa/test.tsv", "test", _openbookqa_rows),
}


def _local_dataset(name: str, path: str, **_metadata: Any) -> Any:
    """``custom_dataset`` hook: the local file as a ``DatasetDict`` with the stock task's eval split."""
    import datasets

    rows = _TASKS[name].rows(Path(path))
    ds = rows if isinstance(rows, datasets.Dataset) else datasets.Dataset.from_list(rows)
    return datasets.DatasetDict({_TASKS[name].split: ds})


@functools.lru_cache(maxsize=None)
def local_docs(name: str, data_dir: str | None = None) -> Any:
    """The local documents of a task as rows of its hub dataset (before the task's ``process_docs``)."""
    check_tasks([name], data_dir, allow_hub=False)
    path = find_data_file(_TASKS[name].local, data_dir)
    return _local_dataset(name, str(path))[_TASKS[name].split]


# ---------------------------------------------------------------- task checks and configs


def _hub_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_problem(dataset_path: str) -> str | None:
    """None when the hub answers for this dataset, else why not (one line)."""
    if _hub_offline():
        return "the hub is switched off (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE)"
    return _hub_probe(dataset_path)


@functools.lru_cache(maxsize=None)
def _hub_probe(dataset_path: str) -> str | None:
    try:
        from huggingface_hub import HfApi

        HfApi().dataset_info(dataset_path, timeout=10)
    except Exception as e:  # no network, no such dataset, ...
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        return f"cannot reach {dataset_path} on the hub ({first})"
    return None


def _stock_config(name: str) -> dict[str, Any]:
    """The stock lm-eval YAML config of a task, ``!function`` hooks resolved, includes merged."""
    import lm_eval.tasks

    path = Path(lm_eval.tasks.__file__).parent / _TASKS[name].stock_yaml
    try:
        from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval >= 0.4.10
    except ImportError:  # older releases
        from lm_eval.utils import load_yaml_config as load_yaml  # type: ignore[no-redef]
    if not path.is_file():
        raise UserError(f"the installed lm-eval has no {_TASKS[name].stock_yaml}; install lm-eval 0.4.x")
    cfg = deepcopy(load_yaml(path))
    if cfg.get("task") != name:
        raise UserError(f"{path} defines task {cfg.get('task')!r}, not {name!r}; unexpected lm-eval version")
    return cfg


def check_tasks(tasks: list[str], data_dir: str | None, allow_hub: bool = True) -> None:
    """Fail early, with one line, for an unknown task or one whose data is nowhere to be found."""
    for name in tasks:
        if name not in _TASKS:
            raise UserError(f"unknown zero-shot task {name!r}; known tasks: {', '.join(KNOWN_TASKS)}")
    if not tasks:
        raise UserError(f"no zero-shot task given; known tasks: {', '.join(KNOWN_TASKS)}")
    for name in tasks:
        spec = _TASKS[name]
        if find_data_file(spec.local, data_dir) is not None:
            continue
        where = ", ".join(str(r) for r in data_roots(data_dir))
        why = "not looking at the hub"
        if allow_hub:
            why = _hub_problem(_stock_config(name)["dataset_path"]) or ""
            if not why:
                continue
        raise UserError(f"zero-shot task {name} needs {spec.local} under a data folder (looked in {where}; "
                        f"use --data-dir or set PRUNERZERO_DATA), and {why}")


def _once_per_dataset(process_docs: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """The task's own ``process_docs``, run once per dataset object.

    lm-eval calls ``process_docs`` on every access to ``eval_docs`` (three times while building a
    task); for HellaSwag that is a 10k-row ``map`` each time.
    """
    done: dict[int, tuple[Any, Any]] = {}

    @functools.wraps(process_docs)
    def wrapper(dataset: Any) -> Any:
        hit = done.get(id(dataset))
        if hit is None or hit[0] is not dataset:
            hit = done[id(dataset)] = (dataset, process_docs(dataset))
        return hit[1]

    return wrapper


def _task_config(name: str, data_dir: str | None) -> tuple[dict[str, Any], str]:
    """The stock config of a task, pointed at the local file when there is one; and the data source."""
    spec = _TASKS[name]
    cfg = _stock_config(name)
    for key in ("tag", "group", "task_list"):  # as lm-eval's TaskFactory does for a single task
        cfg.pop(key, None)
    cfg["num_fewshot"] = 0  # zero-shot; none of the seven stock configs sets another default
    if callable(cfg.get("process_docs")):
        cfg["process_docs"] = _once_per_dataset(cfg["process_docs"])
    meta = cfg.get("metadata")
    cfg["metadata"] = dict(meta) if isinstance(meta, dict) else {"_metadata": meta}
    path = find_data_file(spec.local, data_dir)
    if path is None:
        cfg["metadata"]["config_source"] = f"lm_eval/tasks/{spec.stock_yaml}"
        return cfg, f"hub:{cfg['dataset_path']}"
    cfg["metadata"]["config_source"] = f"lm_eval/tasks/{spec.stock_yaml} with local data"
    cfg.update(
        custom_dataset=functools.partial(_local_dataset, name, str(path)),
        dataset_path=str(path),
        dataset_name=None,
        dataset_kwargs=None,
        training_split=None,
        validation_split=spec.split if spec.split == "validation" else None,
        test_split=spec.split if spec.split == "test" else None,
    )
    return cfg, f"local:{path}"


def build_task(name: str, data_dir: str | None = None) -> Any:
    """An lm-eval ``ConfigurableTask`` for one of :data:`KNOWN_TASKS` (its documents loaded)."""
    from lm_eval.api.task import ConfigurableTask

    check_tasks([name], data_dir)
    cfg, source = _task_config(name, data_dir)
    with _quiet_task_building():
        task = ConfigurableTask(config=cfg)
    task.prunerzero_source = source
    return task


class _DropCustomDatasetHint(logging.Filter):
    # lm-eval logs a hint about `--metadata` for every task with a `custom_dataset`; ours take none.
    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed to `--metadata`" not in record.getMessage()


@contextlib.contextmanager
def _quiet_task_building() -> Iterator[None]:
    """No `--metadata` hint and no ``datasets`` progress bars while a task loads its documents."""
    import datasets

    task_log = logging.getLogger("lm_eval.api.task")
    hint = _DropCustomDatasetHint()
    task_log.addFilter(hint)
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        task_log.removeFilter(hint)
        if bars:
            datasets.enable_progress_bars()


# ---------------------------------------------------------------- evaluation


def evaluate_zeroshot(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    limit: int | None = None,
    data_dir: str | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Zero-shot accuracy of an in-memory causal LM on ``tasks``.

    Returns ``{"tasks": {task: {"acc", "acc_norm" (where the stock task reports it), "n",
    "acc_stderr", "acc_norm_stderr", "source"}}, "mean_acc"}``; ``mean_acc`` is the plain mean of
    ``acc`` over the tasks (as the Wanda / Pruner-Zero tables average).
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    check_tasks(tasks, data_dir)
    task_objs = [build_task(name, data_dir) for name in tasks]
    was_training = getattr(model, "training", False)
    model.eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=task_objs,
            num_fewshot=None,  # the tasks' own default, set to 0 in _task_config
            limit=limit,
            log_samples=False,
            bootstrap_iters=0 if limit is not None and limit < 2 else 1000,
            # An empty task manager: the tasks are built already, and indexing every
            # lm-eval YAML would cost seconds.
            task_manager=TaskManager(include_defaults=False),
        )
    finally:
        if was_training:
            model.train()
    results, counts = out["results"], out.get("n-samples", {})
    per_task: dict[str, dict[str, Any]] = {}
    for name, task in zip(tasks, task_objs):
        r = results[name]
        entry: dict[str, Any] = {"acc": float(r["acc,none"])}
        if "acc_norm,none" in r:
            entry["acc_norm"] = float(r["acc_norm,none"])
        n = counts.get(name, {}).get("effective")
        if n is None:
            docs = len(task.eval_docs)
            n = min(docs, limit) if limit else docs
        entry["n"] = int(n)
        for key in ("acc", "acc_norm"):
            stderr = r.get(f"{key}_stderr,none")
            if isinstance(stderr, (int, float)) and math.isfinite(stderr):
                entry[f"{key}_stderr"] = float(stderr)
        entry["source"] = task.prunerzero_source
        per_task[name] = entry
    mean = sum(e["acc"] for e in per_task.values()) / len(per_task)
    return {"tasks": per_task, "mean_acc": mean}


def format_table(result: dict[str, Any]) -> str:
    """A markdown table of acc and acc_norm per task (in percent), with the mean of acc."""
    lines = ["| task | n | acc | acc_norm |", "|---|---:|---:|---:|"]
    for name, e in result["tasks"].items():
        norm = f"{100 * e['acc_norm']:.2f}" if "acc_norm" in e else "-"
        lines.append(f"| {name} | {e.get('n', '')} | {100 * e['acc']:.2f} | {norm} |")
    lines.append(f"| mean | | {100 * result['mean_acc']:.2f} | |")
    return "\n".join(lines)
