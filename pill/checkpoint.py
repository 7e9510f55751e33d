"""Adapter checkpoints in PEFT's layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

Only the method's parameters are saved (those trained in any stage). Loading checks the saved method, its
configuration and the base model's shape against the model and names every mismatch. Writes are atomic: both
files go to a hidden temporary directory beside the target, flushed to disk, which then takes the target's place
in one step (`replace_directory`), so a crash leaves either the old checkpoint or the new one, never a mix.
Only safetensors is read (never pickle).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # a torch built without distributed support has no shards to gather
    class DTensor:  # type: ignore[no-redef]
        pass

    distribute_tensor = None

from .files import read_json, read_safetensors, replace_directory
from .methods import get_method, method_names
from .model import MultimodalLlamaForCausalLM, adapter_parameters, multimodal_of, set_kernel_backend, set_stage

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1
_BASE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "intermediate_size", "vocab_size")


def _base_model_signature(model) -> dict:
    return {key: getattr(model.config, key, None) for key in _BASE_KEYS}


# Method-config fields that choose how the adapter runs, not what it is: never saved, never compared on load.
RUNTIME_FIELDS = ("backend",)


def _adapter_fields(config: dict) -> dict:
    return {key: value for key, value in config.items() if key not in RUNTIME_FIELDS}


def adapter_config(model) -> dict:
    mm = multimodal_of(model)
    return {
        "pill_type": mm.method,
        "pill_format_version": FORMAT_VERSION,
        "config": _adapter_fields(mm.config.to_dict()),
        "vision_dim": mm.vision_dim,
        "image_token_id": mm.image_token_id,
        "stage": mm.stage,
        "base_model": _base_model_signature(model),
    }


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """`t` whole, detached, contiguous, on CPU. An FSDP shard (DTensor) is gathered from every rank: a collective,
    so every rank must call it, in the same order."""
    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t.detach().to("cpu").contiguous()


def shard_like(value: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A whole tensor `value` placed as `p` is: on its device and, for an FSDP shard, as this rank's shard."""
    value = value.to(p.device)
    if isinstance(p, DTensor):
        value = distribute_tensor(value, p.device_mesh, p.placements)
    return value


def _assign(p: torch.Tensor, value: torch.Tensor) -> None:
    p.copy_(shard_like(value.to(p.dtype), p))


def save_adapter(model, path: str | os.PathLike, metadata: dict | None = None,
                 tensors: dict[str, torch.Tensor] | None = None, extra_files: dict[str, str] | None = None) -> Path:
    """Write the adapter of `model` to directory `path` atomically; returns the path. tensors: the adapter's
    tensors gathered beforehand (by `full_tensor` on every rank of an FSDP run) instead of the model's own.
    extra_files: {file name: text} written into the same directory in the same atomic step (a run record)."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"save_adapter: {target} exists and is not a directory")
    config = adapter_config(model)
    if metadata:
        config["metadata"] = metadata
    params = adapter_parameters(model)
    if tensors is None:
        tensors = {name: full_tensor(p) for name, p in params.items()}
    elif sorted(tensors) != sorted(params):
        raise ValueError(f"save_adapter: tensors must hold exactly the adapter's parameters {sorted(params)}, "
                         f"got {sorted(tensors)}")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        save_file(tensors, str(staging / WEIGHTS_NAME), metadata={"format": "pt", "pill_type": config["pill_type"]})
        with open(staging / CONFIG_NAME, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        with open(staging / WEIGHTS_NAME, "rb+") as f:
            os.fsync(f.fileno())
        for name, text in (extra_files or {}).items():
            if Path(name).name != name or name in (CONFIG_NAME, WEIGHTS_NAME):
                raise ValueError(f"save_adapter: extra_files: {name!r} must be a plain file name other than the "
                                 f"adapter's own files")
            with open(staging / name, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def read_adapter_config(path: str | os.PathLike) -> dict:
    config_path = Path(path) / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path}: not a pill adapter directory")
    config = read_json(config_path, "an adapter configuration")
    if config.get("pill_type") not in method_names():
        raise ValueError(f"{config_path}: pill_type must be one of {method_names()}, got "
                         f"{config.get('pill_type')!r}")
    if config.get("pill_format_version") != FORMAT_VERSION:
        raise ValueError(f"{config_path}: pill_format_version {config.get('pill_format_version')!r} is not "
                         f"supported (this version reads {FORMAT_VERSION})")
    return config


def _mismatches(saved: dict, current: dict, prefix: str) -> list[str]:
    return [f"{prefix}{key}: checkpoint has {saved.get(key)!r}, model has {current.get(key)!r}"
            for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]


def load_adapter(model, path: str | os.PathLike, *, set_saved_stage: bool = True) -> None:
    """Load an adapter saved by `save_adapter` into a model with the same method injected.

    The model is switched to the stage the adapter was saved in unless ``set_saved_stage=False``.
    Raises ValueError listing every mismatch of method, method configuration, vision width, image token and
    base model shape, and every missing, unexpected or mis-shaped tensor.
    """
    multimodal_of(model)  # a TypeError naming the model's class when it has no method injected
    saved = read_adapter_config(path)
    current = adapter_config(model)
    problems = []
    if saved["pill_type"] != current["pill_type"]:
        problems.append(f"method: checkpoint is {saved['pill_type']!r}, model has {current['pill_type']!r}")
    else:
        problems += _mismatches(_adapter_fields(saved["config"]), current["config"], "config.")
    for key in ("vision_dim", "image_token_id"):
        if saved.get(key) != current[key]:
            problems.append(f"{key}: checkpoint has {saved.get(key)!r}, model has {current[key]!r}")
    problems += _mismatches(saved.get("base_model", {}), current["base_model"], "base_model.")
    if problems:
        raise ValueError(f"adapter at {path} does not match this model:\n  " + "\n  ".join(problems))
    weights_path = Path(path) / WEIGHTS_NAME
    if not weights_path.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {path}")
    tensors = read_safetensors(weights_path)
    params = adapter_parameters(model)
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    shapes = [f"{n}: checkpoint {tuple(tensors[n].shape)}, model {tuple(params[n].shape)}"
              for n in sorted(set(params) & set(tensors)) if tensors[n].shape != params[n].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"adapter at {path} does not fit this model: missing {missing}, unexpected {unexpected}, "
                         f"shape mismatches {shapes}")
    with torch.no_grad():
        for name, p in params.items():
            _assign(p, tensors[name])
    if set_saved_stage:
        set_stage(model, saved["stage"])


def load_pretrained_adapter(model, path: str | os.PathLike, *, backend: str | None = None,
                            vision_encoder=None) -> MultimodalLlamaForCausalLM:
    """Inject the method recorded in `path` into a plain LlamaForCausalLM and load its weights; its fused ops
    run on `backend` (None: pill_kernels' default), whatever backend the adapter was trained with."""
    saved = read_adapter_config(path)
    method = get_method(saved["pill_type"], where=f"{Path(path) / CONFIG_NAME}: pill_type")
    config = method.config_class.from_dict(_adapter_fields(saved["config"]))
    model = method.inject(model, config, vision_dim=saved["vision_dim"], image_token_id=saved["image_token_id"],
                          vision_encoder=vision_encoder)
    set_kernel_backend(model, backend)
    load_adapter(model, path)
    return model
