"""Reading the seed repositories' released checkpoints: their pickles opened safely, and their keys taken one by
one so that a conversion names every key it did not use, every key it needed and did not find, and every shape
it did not expect.

The seeds save torch pickles (`torch.save`). They are opened with ``torch.load(weights_only=True)``, which
rebuilds tensors and plain containers only, plus an allow-list of exactly the classes the seeds' files hold
(`argparse.Namespace`, the training arguments that PILL and LaVIN save beside the weights). Any other class is
refused with its name; ``trust_pickle=True`` (`pill convert --trust-pickle`) runs the full unpickler instead,
which can execute code from the file: only for files whose origin the user trusts.
"""
from __future__ import annotations

import argparse
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# What the seeds' checkpoint files hold besides tensors and containers.
ALLOWED_PICKLE_CLASSES = (argparse.Namespace,)


class SeedCheckpointError(ValueError):
    """A seed checkpoint that cannot be converted; the message names the file and the keys."""


@dataclass
class SeedConversion:
    """What a method's converter makes of a seed checkpoint: the method config, the vision width and image
    token of the injected model, the adapter's tensors under this project's parameter names, and notes on the
    choices it made (printed by `pill convert`)."""

    config: Any
    vision_dim: int
    image_token_id: int | None
    tensors: dict[str, torch.Tensor]
    notes: list[str] = field(default_factory=list)


def load_seed_checkpoint(path: str | os.PathLike, *, trust_pickle: bool = False) -> dict:
    """The dictionary stored in a seed's `.pth` file, opened with the allow-list above (or, with `trust_pickle`,
    with the full unpickler)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"seed checkpoint not found: {path}")
    try:
        if trust_pickle:
            data = torch.load(path, map_location="cpu", weights_only=False)
        else:
            with torch.serialization.safe_globals(list(ALLOWED_PICKLE_CLASSES)):
                data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if not found:  # not a class outside the allow-list: a damaged or foreign file
            reason = re.search(r"WeightsUnpickler error: (.+?)(?:\n\n|$)", str(e), re.S)
            raise SeedCheckpointError(f"{path}: not a readable torch checkpoint (the unpickler stopped: "
                                      f"{reason.group(1).strip() if reason else e})") from None
        raise SeedCheckpointError(
            f"{path}: refused to unpickle the class {found.group(1)}: only tensors, containers and "
            f"{', '.join(c.__module__ + '.' + c.__qualname__ for c in ALLOWED_PICKLE_CLASSES)} are loaded from a "
            f"seed checkpoint. If you trust where this file comes from, pass --trust-pickle (trust_pickle=True): "
            f"unpickling can run code from the file") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise SeedCheckpointError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise SeedCheckpointError(f"{path}: expected a dictionary of tensors, got {type(data).__name__}")
    return data


def seed_state_dict(data: dict, where: str) -> dict[str, torch.Tensor]:
    """The tensors of a seed checkpoint: its ``model`` entry when it has one (the training wrapper
    ``{'model', 'optimizer', 'epoch', 'scaler', 'args'}`` and LLaMA-Adapter's ``{'model', 'config'}``), else the
    dictionary itself; the ``module.`` prefix of DDP-wrapped models removed."""
    state = data.get("model", data)
    if not isinstance(state, dict):
        raise SeedCheckpointError(f"{where}: its 'model' entry is a {type(state).__name__}, not a dictionary")
    tensors = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise SeedCheckpointError(f"{where}: {key!r} is a {type(value).__name__}, not a tensor")
        tensors[key.removeprefix("module.")] = value
    return tensors


class AdapterTensors(dict):
    """The converted adapter's tensors by this project's parameter name."""

    def put(self, name: str, tensor: torch.Tensor | None, fn=None) -> None:
        """`tensor` (through `fn`, e.g. a transpose) as parameter `name`; None, a key `SeedKeys.take` already
        recorded as missing or misshapen, is skipped so that every problem is reported together."""
        if tensor is not None:
            self[name] = (fn(tensor) if fn is not None else tensor).contiguous()


class SeedKeys:
    """The tensors of a seed checkpoint, taken by name. `take` checks the shape; `finish` raises one error that
    lists every missing key, every shape mismatch and every key that no rule took."""

    def __init__(self, tensors: dict[str, torch.Tensor], where: str):
        self.tensors = dict(tensors)
        self.where = where
        self.used: set[str] = set()
        self.missing: list[str] = []
        self.misshapen: list[str] = []

    def has(self, key: str) -> bool:
        return key in self.tensors

    def shape(self, key: str) -> tuple[int, ...] | None:
        return tuple(self.tensors[key].shape) if key in self.tensors else None

    def matching(self, pattern: str) -> list[str]:
        return sorted(k for k in self.tensors if re.fullmatch(pattern, k))

    def take(self, key: str, shape: tuple[int, ...] | None = None) -> torch.Tensor | None:
        """The tensor `key` in its own dtype, recorded as used; None, recorded as missing or misshapen, when it
        is absent or its shape is not `shape`."""
        if key not in self.tensors:
            self.missing.append(key)
            return None
        self.used.add(key)
        tensor = self.tensors[key]
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            self.misshapen.append(f"{key}: expected {tuple(shape)}, found {tuple(tensor.shape)}")
            return None
        return tensor

    def skip(self, key: str) -> None:
        """A key the conversion deliberately drops (e.g. LLaMA-Adapter V2's unused layer-0 gate)."""
        self.used.add(key)

    def finish(self, refused: dict[str, str] | None = None) -> None:
        """Raise when anything was missing, misshapen or left over. `refused` maps key patterns (regular
        expressions) of recognised but unsupported parts to the reason, reported with the keys they match."""
        unused = sorted(set(self.tensors) - self.used)
        problems = []
        for pattern, reason in (refused or {}).items():
            hits = [k for k in unused if re.fullmatch(pattern, k)]
            if hits:
                problems.append(f"{len(hits)} key(s) like {hits[0]!r}: {reason}")
                unused = [k for k in unused if k not in hits]
        if self.missing:
            problems.append(f"missing key(s): {_listing(self.missing)}")
        if self.misshapen:
            problems.append(f"unexpected shape(s): {_listing(self.misshapen)}")
        if unused:
            problems.append(f"unknown key(s): {_listing(unused)}")
        if problems:
            raise SeedCheckpointError(f"{self.where}: cannot convert:\n  " + "\n  ".join(problems))


def build_method_config(config_class, inferred: dict, overrides: dict, where: str):
    """The method config from what the checkpoint tells (`inferred`) and what the user gives (`overrides`, which
    win); a bad field is an error naming it."""
    try:
        return config_class.from_dict({**inferred, **overrides})
    except (ValueError, TypeError) as e:
        raise SeedCheckpointError(f"{where}: method config (inferred {inferred}, given {overrides}): {e}") from None


def _listing(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" ... and {len(items) - limit} more" if len(items) > limit else "")


def layer_indices(keys: SeedKeys, pattern: str) -> list[int]:
    """The sorted layer numbers captured by the first group of `pattern` over the checkpoint's keys."""
    found = {int(m.group(1)) for k in keys.tensors if (m := re.fullmatch(pattern, k))}
    return sorted(found)


def rope_rows_to_hf(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows in q/k output space from Meta's interleaved RoPE order (pairs 2i, 2i+1 per head) to transformers'
    half-split order (pairs i, i + head_dim / 2): the permutation transformers' own LLaMA converter applies to
    ``wq`` / ``wk``. A 1-D tensor (a bias) is permuted as one column."""
    vector = weight.dim() == 1
    w = weight.unsqueeze(1) if vector else weight
    rows, cols = w.shape
    if rows % (2 * heads):
        raise SeedCheckpointError(f"cannot permute {rows} q/k rows into {heads} heads of even width")
    w = w.reshape(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)
    return w.squeeze(1) if vector else w
