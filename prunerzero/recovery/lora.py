"""LoRA fine-tuning of a pruned model that keeps its zeros.

The adapters are trained on windows of calibration-style text (WikiText-2 *validation*, or the
local C4 sample, never the test split used for perplexity) with a plain AdamW loop. The base
weights are frozen, so while the adapters stay unmerged the pruned zeros are untouched.
:func:`merge_and_remask` folds the adapters into the weights and sets the original zeros back
to zero, so a merged model is exactly as sparse as the pruned one.

Command line: ``prunerzero finetune --model PRUNED_DIR [--config lora.yaml] [--merge] ...``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from tqdm import tqdm

from prunerzero.data import calibration_windows
from prunerzero.errors import UserError
from prunerzero.models import model_device, prunable_linears

log = logging.getLogger(__name__)

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSettings:
    """What to train and how. Precedence: these defaults < a YAML file < command-line flags."""

    rank: int = 8
    alpha: float = 16
    dropout: float = 0.05
    targets: tuple[str, ...] = field(default=DEFAULT_TARGETS)
    steps: int = 100
    lr: float = 1e-4
    seqlen: int = 512
    batch_size: int = 1
    seed: int = 0
    data: str = "wikitext2"  # wikitext2 (validation split), c4 (local train sample) or a text file
    eval_windows: int | None = None

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            object.__setattr__(self, name, _coerce(name, value))
        self._check()

    def _check(self) -> None:
        problems = []
        if self.rank < 1:
            problems.append(f"rank must be at least 1, got {self.rank}")
        if self.alpha <= 0:
            problems.append(f"alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            problems.append("targets must name at least one module")
        if self.steps < 1:
            problems.append(f"steps must be at least 1, got {self.steps}")
        if self.lr <= 0:
            problems.append(f"lr must be positive, got {self.lr}")
        if self.seqlen < 2:
            problems.append(f"seqlen must be at least 2, got {self.seqlen}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be at least 1, got {self.batch_size}")
        if self.eval_windows is not None and self.eval_windows < 1:
            problems.append(f"eval_windows must be at least 1, got {self.eval_windows}")
        if problems:
            raise UserError("LoRA settings: " + "; ".join(problems))

    @classmethod
    def from_yaml(cls, path: str | Path) -> "LoraSettings":
        """Settings from a YAML mapping of field names; unknown keys are an error."""
        import yaml

        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise UserError(f"cannot read LoRA config {path}: {e.strerror or e}") from None
        except yaml.YAMLError as e:
            raise UserError(f"LoRA config {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise UserError(f"LoRA config {path} must be a mapping of settings, not {type(data).__name__}")
        return cls().updated({str(k).replace("-", "_"): v for k, v in data.items()}, origin=str(path))

    def updated(self, values: Mapping[str, Any], origin: str = "overrides") -> "LoraSettings":
        """A copy with ``values`` applied; ``None`` values are skipped (a flag not given)."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"unknown LoRA setting(s) in {origin}: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return replace(self, **{k: v for k, v in values.items() if v is not None})


def _coerce(name: str, value: Any) -> Any:
    """The value of setting ``name`` converted to its type, or a UserError naming the setting."""
    if name == "targets":
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(t, str) for t in items):
            raise UserError(f"LoRA setting targets must be module names (a list or 'q_proj,v_proj'), got {value!r}")
        return tuple(t.strip() for t in items if t.strip())
    if name == "eval_windows" and value is None:
        return None
    kind = {"rank": int, "steps": int, "seqlen": int, "batch_size": int, "seed": int, "eval_windows": int,
            "alpha": float, "dropout": float, "lr": float, "data": str}[name]
    if kind is int and (isinstance(value, bool) or (isinstance(value, float) and not value.is_integer())):
        raise UserError(f"LoRA setting {name} must be an integer, got {value!r}")
    if kind is not str and isinstance(value, (list, dict)):
        raise UserError(f"LoRA setting {name} must be a number, got {value!r}")
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise UserError(f"LoRA setting {name} must be {'an integer' if kind is int else 'a number'}, got {value!r}") from None


# --- the model side -------------------------------------------------------------------------


def linear_module_names(model: nn.Module) -> list[str]:
    """Short names (last name component) of every ``nn.Linear`` in the model, sorted."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear) and name})


def check_targets(model: nn.Module, targets: tuple[str, ...]) -> None:
    available = linear_module_names(model)
    missing = [t for t in targets if t not in available]
    if missing:
        raise UserError(
            f"LoRA target module(s) {', '.join(missing)} not found in {type(model).__name__}; "
            f"its linear modules are: {', '.join(available)}"
        )


def base_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The prunable linear layers by their plain name, whether or not LoRA adapters wrap them.

    Under peft a wrapped layer's weights live in ``<name>.base_layer``; the adapters' own
    ``lora_A`` / ``lora_B`` linears are not base weights and are left out.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    out = {}
    for name, lin in prunable_linears(inner).items():
        if ".lora_" in name:
            continue
        out[name.removesuffix(".base_layer")] = lin
    return out


def base_sparsity(model: nn.Module) -> float:
    """Fraction of zeros over the base weights of all prunable linear layers (adapters excluded)."""
    zeros = total = 0
    for lin in base_linears(model).values():
        zeros += int((lin.weight == 0).sum())
        total += lin.weight.numel()
    return zeros / total if total else 0.0


# --- training ------------------------------------------------------------------------------


def training_windows(tokenizer: Any, settings: LoraSettings, data_dir: str | None = None) -> torch.Tensor:
    """``steps * batch_size`` seeded random windows of ``seqlen`` tokens from the training text."""
    split = "train" if settings.data == "c4" else ("validation" if settings.data == "wikitext2" else None)
    return calibration_windows(tokenizer, settings.data, settings.steps * settings.batch_size, settings.seqlen,
                               settings.seed, split=split, data_dir=data_dir, repeat=True)


def batch_order(n_windows: int, steps: int, batch_size: int, seed: int) -> torch.Tensor:
    """Row indices, shape (steps, batch_size): seeded permutations of the windows, repeated as needed."""
    gen = torch.Generator().manual_seed(seed)
    need = steps * batch_size
    perms = [torch.randperm(n_windows, generator=gen) for _ in range(-(-need // n_windows))]
    return torch.cat(perms)[:need].reshape(steps, batch_size)


def wrap_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """The model with fresh LoRA adapters (``get_peft_model``); only the adapters are trainable."""
    from peft import LoraConfig, get_peft_model

    check_targets(model, settings.targets)
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.targets), bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(settings.seed)  # the adapters' initialisation
    return get_peft_model(model, config)


def finetune_lora(
    model: nn.Module,
    tokenizer: Any,
    settings: LoraSettings,
    progress: bool = True,
    *,
    windows: torch.Tensor | None = None,
    data_dir: str | None = None,
) -> dict[str, Any]:
    """Train LoRA adapters on ``model`` (wrapped in place by peft) and return what happened.

    ``windows``: token windows, shape (n, seqlen), to train on; each step takes ``batch_size`` of
    them in a seeded order. Without it they are drawn from ``settings.data`` with ``tokenizer``.
    Returns ``peft_model`` (adapters unmerged, in eval mode), ``losses`` (one per step),
    ``seconds``, ``steps``, ``tokens`` and ``trainable_parameters``.
    """
    if windows is None:
        if tokenizer is None:
            raise UserError("finetune_lora needs a tokenizer or pre-tokenized windows")
        windows = training_windows(tokenizer, settings, data_dir)
    if windows.dim() != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        raise UserError(f"training windows must have shape (n, seqlen >= 2), got {tuple(windows.shape)}")
    peft_model = wrap_lora(model, settings)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    log.info("LoRA rank %d alpha %g on %s: %d trainable parameters; %d steps of %d x %d tokens, lr %g",
             settings.rank, settings.alpha, ",".join(settings.targets), n_trainable, settings.steps,
             settings.batch_size, windows.shape[1], settings.lr)
    losses, seconds = _train(peft_model, trainable, windows, settings, progress)
    log.info("fine-tuned in %.1f s: loss %.4f (first step) -> %.4f (mean of the last %d)",
             seconds, losses[0], tail_mean(losses), min(10, len(losses)))
    return {"peft_model": peft_model, "losses": losses, "seconds": seconds, "steps": settings.steps,
            "tokens": settings.steps * settings.batch_size * windows.shape[1], "trainable_parameters": n_trainable}


def _train(peft_model: nn.Module, params: list[nn.Parameter], windows: torch.Tensor, settings: LoraSettings,
           progress: bool) -> tuple[list[float], float]:
    device = model_device(peft_model)
    optimizer = torch.optim.AdamW(params, lr=settings.lr)
    order = batch_order(windows.shape[0], settings.steps, settings.batch_size, settings.seed)
    losses: list[float] = []
    start = time.perf_counter()
    peft_model.train()
    bar = tqdm(order, desc="finetune lora", unit="step", disable=not progress)
    try:
        for rows in bar:
            ids = windows[rows].to(device)
            loss = peft_model(input_ids=ids, labels=ids, use_cache=False).loss
            value = loss.item()
            if not math.isfinite(value):
                raise UserError(f"the training loss became {value} at step {len(losses) + 1}; use a smaller --lr")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(value)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            log.debug("step %d loss %.4f", len(losses), losses[-1])
    finally:
        bar.close()
        peft_model.eval()
    return losses, time.perf_counter() - start


def tail_mean(values: list[float], n: int = 10) -> float:
    tail = values[-n:]
    return sum(tail) / len(tail)


@torch.no_grad()
def merge_and_remask(peft_model: nn.Module) -> nn.Module:
    """Merge the LoRA adapters into the weights and zero again every weight that was zero before.

    Returns the plain (unwrapped) model; its sparsity equals the pruned model's.
    """
    from peft.tuners.lora import LoraLayer

    inner = peft_model.get_base_model()
    masks = {name: module.get_base_layer().weight == 0
             for name, module in inner.named_modules() if isinstance(module, LoraLayer)}
    model = peft_model.merge_and_unload()
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        modules[name].weight[mask] = 0
    log.info("merged the adapters of %d layers and re-applied their zero masks (%d zeros)",
             len(masks), sum(int(m.sum()) for m in masks.values()))
    return model
