"""`pill convert`: a seed repository's released checkpoint as this project's adapter directory.

    convert_seed_checkpoint("llama_adapter_v2", "BIAS-7B.pth", base="llama-7b-hf", output="adapters/bias-7b")

reads the seed's pickle safely (`pill.seed_format`), maps every tensor onto this project's parameter names with
the method's own converter (`convert_seed_checkpoint` in `pill/methods/<method>.py`), checks the result
against the method injected into the base model's shape (built on the meta device: no weights are loaded),
and writes ``adapter_config.json`` + ``adapter_model.safetensors`` (+ ``pill_run.json`` naming the base and
the vision encoder when given) atomically: nothing is written unless the whole conversion succeeds. The
adapter then loads with `pill.load_pretrained_adapter(LlamaForCausalLM.from_pretrained(base), output)`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .seed_format import SeedCheckpointError, SeedKeys, load_seed_checkpoint, seed_state_dict


def _not_llama(where, model_type) -> ValueError:
    return ValueError(f"base: {where} is a {model_type!r} model: the seed checkpoints are LLaMA adapters (LLaMA-7B / "
                      f"13B), so conversion is onto a LLaMA base only; train on other families with `pill train`")


def _base_config(base):
    """A transformers LlamaConfig from `base`: a LlamaConfig, or an HF checkpoint directory / its config.json.
    Another family's config is refused by name."""
    from transformers import LlamaConfig, PretrainedConfig

    if isinstance(base, LlamaConfig):
        return base
    if isinstance(base, PretrainedConfig):
        raise _not_llama(type(base).__name__, getattr(base, "model_type", None))
    path = Path(base)
    if path.is_dir() and (path / "params.json").is_file() and list(path.glob("consolidated.*.pth")):
        raise SeedCheckpointError(meta_base_instructions(path))
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise FileNotFoundError(f"base: no Hugging Face LLaMA config at {config_file} (pass the directory of a "
                                f"transformers LlamaForCausalLM checkpoint; for Meta-format weights, convert them "
                                f"first: see docs/convert.md)")
    config = LlamaConfig.from_json_file(str(config_file))
    if getattr(config, "model_type", "llama") != "llama":
        raise _not_llama(config_file, config.model_type)
    return config


# Meta's widths per model size, as transformers' converter names the sizes.
_META_SIZES = {4096: "7B", 5120: "13B", 6656: "30B", 8192: "65B"}


def meta_base_instructions(path: Path) -> str:
    """What to run to turn a Meta-format LLaMA directory into the Hugging Face checkpoint `--base` needs.
    transformers' own converter does it, but transformers' wheels leave its conversion scripts out, so it is
    named rather than called (and not re-implemented here)."""
    from .files import read_json

    params = read_json(path / "params.json", "Meta LLaMA parameters")
    size = _META_SIZES.get(params.get("dim"), "<7B|13B|30B|65B>")
    # LLaMA-2 checkpoints use norm_eps 1e-5, LLaMA-1 1e-6.
    version = "2" if params.get("norm_eps") == 1e-5 else "1"
    return (f"base: {path} is a Meta-format LLaMA (params.json + consolidated.*.pth); convert it to a Hugging Face "
            f"checkpoint first with transformers' LLaMA converter, "
            f"src/transformers/models/llama/convert_llama_weights_to_hf.py in transformers' source repository "
            f"(installed transformers wheels do not ship it), then pass the output as --base:\n"
            f"  python convert_llama_weights_to_hf.py --input_dir {path} --model_size {size} "
            f"--llama_version {version} --output_dir {path}-hf\n"
            f"(it reads {path / 'tokenizer.model'}; put Meta's tokenizer.model there if it is beside the directory)")


def convert_seed_checkpoint(method: str, checkpoint: str | os.PathLike, base, output: str | os.PathLike, *,
                            trust_pickle: bool = False, method_config: dict | None = None,
                            image_token_id: int | None = None, vision: dict | None = None,
                            prompt: dict | None = None) -> dict:
    """Convert `checkpoint` (the `method` seed's released `.pth`) for the LLaMA base `base` (an HF directory or a
    LlamaConfig) into the adapter directory `output`. `method_config`: fields the file cannot tell (LLaMA-Adapter
    V2's ``visual_heads``, LaVIN's ``temperature``; LaVIN's ``skip_vision_routers``). `vision` / `prompt`: the
    run record's vision encoder and prompt (`pill.recipe`), so that `pill eval` / `pill generate` need only the
    adapter directory. Returns a summary (method, config, tensors, parameters, notes)."""
    from transformers import LlamaForCausalLM

    from .checkpoint import save_adapter
    from .methods import get_method
    from .model import adapter_parameters, set_stage
    from .recipe import RUN_RECORD

    spec = get_method(method, where="method")
    if spec.convert_seed is None:
        raise ValueError(f"method {method!r} has no seed checkpoint converter")
    config = _base_config(base)
    where = str(checkpoint)
    state = seed_state_dict(load_seed_checkpoint(checkpoint, trust_pickle=trust_pickle), where)
    conversion = spec.convert_seed(SeedKeys(state, where), config, dict(method_config or {}), image_token_id)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
        model = spec.inject(model, conversion.config, vision_dim=conversion.vision_dim,
                            image_token_id=conversion.image_token_id)
    set_stage(model, conversion.config.stages[-1])  # the released models are used as trained to the end
    expected = {name: tuple(p.shape) for name, p in adapter_parameters(model).items()}
    got = {name: tuple(t.shape) for name, t in conversion.tensors.items()}
    if expected != got:  # a converter bug, or a config override that changes the shapes
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        shapes = sorted(f"{n}: converted {got[n]}, model {expected[n]}" for n in set(got) & set(expected)
                        if got[n] != expected[n])
        raise SeedCheckpointError(f"{where}: the converted tensors do not fit {method} on this base: missing "
                                  f"{missing[:8]}, unexpected {extra[:8]}, shapes {shapes[:8]}")
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in conversion.tensors.items()}
    metadata = {"converted_from": {"method": method, "checkpoint": Path(checkpoint).name}}
    extra = {}
    if vision is not None or prompt is not None or not isinstance(base, type(config)):
        llm = None if isinstance(base, type(config)) else str(Path(base).resolve())
        record = {"llm": llm, "vision": vision, "prompt": prompt or {}, "cache_dir": None}
        extra[RUN_RECORD] = json.dumps(record, indent=2)
    target = save_adapter(model, output, metadata=metadata, tensors=tensors, extra_files=extra)
    return {"method": method, "output": str(target), "config": conversion.config.to_dict(),
            "vision_dim": conversion.vision_dim, "image_token_id": conversion.image_token_id,
            "tensors": len(tensors), "parameters": sum(t.numel() for t in tensors.values()),
            "notes": conversion.notes}
