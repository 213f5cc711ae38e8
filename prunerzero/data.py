"""Text data: where it is, how it is read, how calibration windows are drawn.

Data are resolved in one place, in this order: a path given by the user, the ``PRUNERZERO_DATA``
environment variable, the ``shared/data`` folder beside the project checkout, then the hub (via
``datasets``). Sources are named ``wikitext2``, ``c4``, or a path to a local text file.
"""

from __future__ import annotations

import json
import logging
import os
import random
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch

from prunerzero.choices import HELDOUT_TEXTS
from prunerzero.errors import UserError

log = logging.getLogger(__name__)

_WIKITEXT_FILES = {"train": "wiki.train.raw", "validation": "wiki.valid.raw", "test": "wiki.test.raw"}
_C4_FILES = {"train": "c4/c4_sample.jsonl", "validation": "c4/c4_validation_2k.parquet"}


def data_roots(configured: str | Path | None = None) -> list[Path]:
    """Candidate data folders, most specific first."""
    roots: list[Path] = []
    if configured:
        roots.append(Path(configured).expanduser())
    if os.environ.get("PRUNERZERO_DATA"):
        roots.append(Path(os.environ["PRUNERZERO_DATA"]).expanduser())
    here = Path(__file__).resolve()
    # here = CHECKOUT/prunerzero/data.py: parents[1] is the checkout, parents[2] the folder that holds it and shared/
    roots += [here.parents[2] / "shared" / "data", Path.cwd().parent / "shared" / "data", Path.cwd() / "data"]
    return roots


def find_data_file(relative: str, data_dir: str | Path | None = None) -> Path | None:
    for root in data_roots(data_dir):
        if (root / relative).is_file():
            return root / relative
    return None


def _wikitext_rows_from_file(path: Path) -> list[str]:
    # Exactly the rows the `datasets` wikitext builder yields: each line with its newline,
    # or "" where the line is blank.
    with open(path, encoding="utf-8") as f:
        return [line if line.strip() else "" for line in f]


@lru_cache(maxsize=8)
def text_rows(source: str, split: str, data_dir: str | None = None) -> tuple[str, ...]:
    """Rows of a named source and split, from local files first, then the hub."""
    if source == "wikitext2":
        if split not in _WIKITEXT_FILES:
            raise UserError(f"wikitext2 has splits {', '.join(_WIKITEXT_FILES)}, not {split!r}")
        path = find_data_file(f"wikitext-2/{_WIKITEXT_FILES[split]}", data_dir)
        if path is not None:
            return tuple(_wikitext_rows_from_file(path))
        return tuple(_hub_rows("wikitext", "wikitext-2-raw-v1", split, f"wikitext-2/{_WIKITEXT_FILES[split]}"))
    if source == "c4":
        if split not in _C4_FILES:
            raise UserError(f"c4 has splits {', '.join(_C4_FILES)}, not {split!r}")
        path = find_data_file(_C4_FILES[split], data_dir)
        if path is not None and path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                return tuple(json.loads(line)["text"] for line in f if line.strip())
        if path is not None:
            import datasets

            return tuple(datasets.load_dataset("parquet", data_files=str(path), split="train")["text"])
        shard = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}[split]
        return tuple(_hub_rows("allenai/c4", None, "train", _C4_FILES[split], data_files={"train": shard}))
    path = Path(source).expanduser()
    if path.is_file():
        return tuple(path.read_text(encoding="utf-8").splitlines(keepends=True))
    raise UserError(f"data source {source!r} is neither wikitext2, c4, nor an existing text file")


def _hub_rows(name: str, config: str | None, split: str, local: str, **kwargs: object) -> list[str]:
    import datasets

    try:
        return list(datasets.load_dataset(name, config, split=split, **kwargs)["text"])
    except Exception as e:  # the hub is unreachable or the dataset is missing
        raise UserError(
            f"cannot find {local} locally (looked in {', '.join(str(r) for r in data_roots())}; set "
            f"PRUNERZERO_DATA) and cannot load {name} from the hub: {str(e).splitlines()[0][:200]}"
        ) from None


def joined_tokens(tokenizer: object, source: str, split: str, sep: str, data_dir: str | None = None,
                  max_tokens: int | None = None) -> torch.Tensor:
    """All rows joined with ``sep`` and tokenized once, as a 1-D tensor of token ids.

    ``max_tokens``: only the first that many are wanted (a fitness budget is a few thousand tokens
    of a split of hundreds of thousands), so a prefix of the text is tokenized, growing until it
    yields a safe margin more than needed; tokens far from the cut are those of the whole text."""
    text = sep.join(text_rows(source, split, data_dir))
    if max_tokens is not None:
        margin = max_tokens + 256
        chars = 8 * margin
        while chars < len(text):
            ids = tokenizer(text[:chars], return_tensors="pt").input_ids[0]
            if ids.numel() >= margin:
                return ids[:max_tokens].clone()
            chars *= 2
    return tokenizer(text, return_tensors="pt").input_ids[0]


def eval_tokens(tokenizer: object, source: str = "wikitext2", split: str = "test", data_dir: str | None = None) -> torch.Tensor:
    """Tokens of an evaluation text, rows joined with "\\n\\n" (the reference perplexity protocol)."""
    return joined_tokens(tokenizer, source, split, "\n\n", data_dir)


# The texts final tables are measured on: they never calibrate, fit or select anything.
HELD_OUT_TEXTS = tuple(tuple(text.split(":")) for text in HELDOUT_TEXTS)  # (source, split)
SPLITS = {"wikitext2": tuple(_WIKITEXT_FILES), "c4": tuple(_C4_FILES)}


def check_text(source: str, split: str | None, role: str, data_dir: str | Path | None = None) -> None:
    """A text a search, a calibration or a fine-tuning may read: a known split of a named source (split
    names compared case-insensitively, so ``Test`` is refused as ``test`` is), never a held-out text
    (WikiText-2 test, C4 validation) and never the WikiText-2 test file given by its path."""
    named = split or default_split(source)
    if named.strip().lower() == "test" or (source, named.strip().lower()) in HELD_OUT_TEXTS:
        raise UserError(f"{role} must not read {source}:{named}: it is held out for the final tables and never "
                        f"calibrates or selects anything; use {source}:{default_split(source)}")
    if source in SPLITS:
        if named not in SPLITS[source]:
            raise UserError(f"{role}: {source} has splits {', '.join(SPLITS[source])}, not {named!r}")
        return
    path = Path(source).expanduser()
    test_file = find_data_file(f"wikitext-2/{_WIKITEXT_FILES['test']}", data_dir)
    if path.is_file() and test_file is not None and path.resolve() == test_file.resolve():
        raise UserError(f"{role} must not read {source}: it is the WikiText-2 test split, held out for the final "
                        "tables; use wikitext2 (validation)")


def default_split(source: str) -> str:
    """The split calibration windows come from when none is named: C4's train, else validation."""
    return "train" if source == "c4" else "validation"


def calibration_windows(
    tokenizer: object,
    source: str,
    nsamples: int,
    seqlen: int,
    seed: int,
    split: str | None = None,
    data_dir: str | None = None,
    repeat: bool = False,
) -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens, shape (nsamples, seqlen), seeded.

    More tokens than the text holds are refused (a typo such as ``--nsamples 100000`` would otherwise
    run for hours) unless ``repeat`` (training windows: several epochs over a short text are fine).

    WikiText and text files: rows joined with " ", tokenized once, each window's start drawn with
    ``randint(0, n_tokens - seqlen - 1)``. C4: as the reference code, draw documents until one is
    longer than ``seqlen`` tokens, then a window inside it. A private ``random.Random(seed)`` gives
    the reference sequence without touching the global RNG.
    """
    if nsamples < 1 or seqlen < 2:
        raise UserError(f"need nsamples >= 1 and seqlen >= 2, got {nsamples} and {seqlen}")
    check_text(source, split, "calibration", data_dir)
    rng = random.Random(seed)
    split = split or default_split(source)
    if source == "c4":
        docs = text_rows(source, split, data_dir)
        out = []
        for _ in range(nsamples):
            for _attempt in range(10 * len(docs)):
                ids = tokenizer(docs[rng.randint(0, len(docs) - 1)], return_tensors="pt").input_ids[0]
                if ids.numel() > seqlen:
                    break
            else:
                raise UserError(f"no C4 document is longer than seqlen={seqlen} tokens; use a smaller --seqlen")
            start = rng.randint(0, ids.numel() - seqlen - 1)
            out.append(ids[start : start + seqlen])
        return torch.stack(out)
    ids = joined_tokens(tokenizer, source, split, " ", data_dir)
    if ids.numel() < seqlen + 2:
        raise UserError(
            f"calibration text {source}:{split} has {ids.numel()} tokens, too short for windows of "
            f"{seqlen}; use a smaller --seqlen or a longer text"
        )
    if nsamples * seqlen > ids.numel() and not repeat:  # windows may overlap, but more tokens than the text holds is a typo
        raise UserError(f"{nsamples} calibration windows of {seqlen} tokens ({nsamples * seqlen} tokens) ask for more "
                        f"than calibration text {source}:{split} holds ({ids.numel()} tokens); use at most "
                        f"--nsamples {ids.numel() // seqlen} at this --seqlen")
    starts = calibration_starts(ids.numel(), nsamples, seqlen, seed)
    return torch.stack([ids[s : s + seqlen] for s in starts])


def calibration_starts(n_tokens: int, nsamples: int, seqlen: int, seed: int) -> list[int]:
    """Where the calibration windows of a joined text start (the reference's seeded draws)."""
    rng = random.Random(seed)
    return [rng.randint(0, n_tokens - seqlen - 1) for _ in range(nsamples)]


def free_spans(n_tokens: int, taken: Sequence[tuple[int, int]], seqlen: int, windows: int) -> list[tuple[int, int]]:
    """The first ``windows`` non-overlapping spans of ``seqlen`` tokens, from the start of a text of
    ``n_tokens``, that share no token with any span in ``taken`` (fewer if the text runs out)."""
    taken = sorted(taken)
    out, pos = [], 0
    while len(out) < windows and pos + seqlen <= n_tokens:
        clash = next(((a, b) for a, b in taken if a < pos + seqlen and pos < b), None)
        if clash is not None:
            pos = clash[1]  # jump past the taken span
            continue
        out.append((pos, pos + seqlen))
        pos += seqlen
    return out


# (source, split, nsamples, seqlen, seed): which windows a calibration draws
CalibrationWindows = tuple[str, "str | None", int, int, int]


def _calibration_spans(n_tokens: int, calibration: CalibrationWindows) -> list[tuple[int, int]]:
    _, _, nsamples, calib_seqlen, seed = calibration
    return [(s, s + calib_seqlen) for s in calibration_starts(n_tokens, nsamples, calib_seqlen, seed)]


def _shares_text(calibration: tuple[str, str | None, int, int, int] | None, source: str, split: str) -> bool:
    return (calibration is not None and calibration[0] == source and (calibration[1] or "validation") == split
            and source != "c4")


def fitness_tokens(tokenizer: object, source: str, split: str, seqlen: int, windows: int,
                   calibration: CalibrationWindows | Sequence[CalibrationWindows] | None,
                   data_dir: str | None = None) -> torch.Tensor:
    """The search's fitness text: ``windows`` windows of ``seqlen`` tokens, concatenated.

    When the fitness text is the calibration text (``calibration`` = (source, split, nsamples,
    seqlen, seed), or a list of them when X and G read different windows), it is tokenized as the
    calibration is (rows joined with " ") and the fitness windows are the first non-overlapping
    windows that share no token with any calibration window: the statistics a metric reads never
    saw the text it is judged on. Otherwise the first ``windows * seqlen`` tokens of the text, rows
    joined with "\n\n"."""
    check_text(source, split, "the fitness text", data_dir)
    need = windows * seqlen
    calibrations = [calibration] if calibration is None or isinstance(calibration[0], str) else list(calibration)
    calibrations = [c for c in calibrations if _shares_text(c, source, split)]
    if not calibrations:
        tokens = joined_tokens(tokenizer, source, split, "\n\n", data_dir, need)
        if tokens.numel() < need:
            raise UserError(f"fitness text {source}:{split} has {tokens.numel()} tokens, fewer than the budget of "
                            f"{windows} x {seqlen}")
        return tokens[:need]
    ids = joined_tokens(tokenizer, source, split, " ", data_dir)
    spans = free_spans(ids.numel(), [s for c in calibrations for s in _calibration_spans(ids.numel(), c)], seqlen, windows)
    if len(spans) < windows:
        raise UserError(f"fitness text {source}:{split} has room for only {len(spans)} windows of {seqlen} tokens "
                        f"outside the calibration windows; lower fitness.windows or the calibration budget")
    return torch.cat([ids[a:b] for a, b in spans])


def unused_tokens(tokenizer: object, source: str, split: str, seqlen: int, windows: int,
                  fitness: tuple[int, int], calibrations: Sequence[CalibrationWindows],
                  data_dir: str | None = None, run_calibrations: int = 1) -> torch.Tensor:
    """``windows`` windows of ``seqlen`` tokens of the fitness text that a search never used: no token
    in its fitness windows (``fitness`` = (seqlen, windows), the first ``run_calibrations`` of
    ``calibrations`` being the run's, as :func:`fitness_tokens` chose them) nor in any of the
    ``calibrations`` windows. For a re-score of a search's best metrics on validation text (the
    test split stays for the final table)."""
    check_text(source, split, "a re-score", data_dir)
    fit_seqlen, fit_windows = fitness
    shared = [_shares_text(c, source, split) for c in calibrations]
    if any(shared) and not shared[0]:
        raise UserError(f"a re-score calibrated on {source}:{split} needs a run calibrated on it too")
    if not shared[0]:  # the fitness text is the first tokens of the text; use what follows
        used = fit_seqlen * fit_windows
        tokens = joined_tokens(tokenizer, source, split, "\n\n", data_dir, used + windows * seqlen)
        if tokens.numel() < used + windows * seqlen:
            raise UserError(f"{source}:{split} has {tokens.numel()} tokens: after the {used} fitness tokens, no room "
                            f"for {windows} windows of {seqlen}; lower the windows")
        return tokens[used : used + windows * seqlen]
    ids = joined_tokens(tokenizer, source, split, " ", data_dir)
    n = ids.numel()
    calib = [span for c in calibrations if _shares_text(c, source, split) for span in _calibration_spans(n, c)]
    run = [span for c in calibrations[:run_calibrations] for span in _calibration_spans(n, c)]
    fit = free_spans(n, run, fit_seqlen, fit_windows)
    spans = free_spans(n, calib + fit, seqlen, windows)
    if len(spans) < windows:
        raise UserError(f"{source}:{split} has room for only {len(spans)} windows of {seqlen} tokens outside the "
                        f"fitness and calibration windows; lower the windows or their length")
    return torch.cat([ids[a:b] for a, b in spans])
