"""The run recipe: the run config file (what `pill train` / `pill eval` read, checked key by key), the record
written next to a trained adapter (``pill_run.json``: LLM, vision encoder, prompt, cache), and loading a trained
adapter for inference from it. `pill.cli` and `pill.demo` both build on this module.

A run config (YAML or JSON; unknown keys are refused, naming the key):

    llm: path/to/hf-model-dir | model.gguf | smollm2                      # LLaMA, Mistral, Qwen2 or Qwen3
    vision: {type: efficientnet-lite0, image_size: 224, grid: null}     # or {type: hf, path: ..., feature_layer: -2}
    method: pill                                                       # pill | lavin | llama_adapter_v2
    method_config: {adapter_dim: 32}                                   # the method's config fields
    init_adapter: runs/stage1/adapter                                  # optional: start from a saved adapter
    prompt: {format: chat, system: null, max_length: 512}
    data:
      train: {type: conversations, path: train.jsonl, image_root: null}     # LLaVA-style JSONL
      eval: {type: scienceqa, root: ScienceQA/data, split: test, limit: null}
    train: {stage: 1, output_dir: runs/stage1, batch_size: 8, grad_accum: 4, blr: 1e-3, epochs: 3, ...}
    eval: {batch_size: 16, max_new_tokens: 64}
    cache_dir: null                                                    # default ~/.cache/pill-kernels
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .llm import QUANTIZED_BITS

RUN_RECORD = "pill_run.json"

TOP_KEYS = {"llm", "vision", "method", "method_config", "init_adapter", "prompt", "data", "train", "eval",
            "cache_dir"}
PROMPT_KEYS = {"format", "system", "max_length"}
EVAL_KEYS = {"batch_size", "max_new_tokens"}
DATA_KEYS = {"conversations": {"type", "path", "image_root"},
             "scienceqa": {"type", "root", "split", "limit", "problems_file", "splits_file", "image_dir"}}


class ConfigError(ValueError):
    pass


def check_keys(mapping, allowed: set, where: str) -> dict:
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(mapping).__name__}")
    unknown = sorted(set(mapping) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    return mapping


def load_run_config(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            config = yaml.safe_load(text)
        else:
            config = json.loads(text)
    except Exception as e:  # yaml and json raise different types; both become one readable message
        raise ConfigError(f"{path}: cannot parse: {e}") from None
    config = check_keys(config, TOP_KEYS, str(path))
    check_keys(config.get("prompt"), PROMPT_KEYS, f"{path}: prompt")
    check_keys(config.get("eval"), EVAL_KEYS, f"{path}: eval")
    data = check_keys(config.get("data"), {"train", "eval"}, f"{path}: data")
    for split, spec in data.items():
        spec = check_keys(spec, set().union(*DATA_KEYS.values()), f"{path}: data.{split}")
        kind = spec.get("type", "conversations")
        if kind not in DATA_KEYS:
            raise ConfigError(f"{path}: data.{split}.type must be one of {sorted(DATA_KEYS)}, got {kind!r}")
        check_keys(spec, DATA_KEYS[kind], f"{path}: data.{split} ({kind})")
    config["_path"] = str(path)
    config["_dir"] = str(path.parent)
    llm_spec(config)  # a bad llm entry fails here, before anything loads
    return config


def llm_spec(config: dict, value=None) -> tuple[str | None, int | None]:
    """(path, bits) of an `llm` entry (the config's unless `value` is given): a path (a Hugging Face directory, a
    .gguf file, "smollm2") or a mapping {path: ..., bits: 4} for a 4-bit frozen base (`pill.llm.load_llm`)."""
    value = config.get("llm") if value is None else value
    bits = None
    if isinstance(value, dict):
        check_keys(value, {"path", "bits"}, f"{config.get('_path', 'config')}: llm")
        value, bits = value.get("path"), value.get("bits")
        if bits is not None and (isinstance(bits, bool) or bits not in QUANTIZED_BITS):
            raise ConfigError(f"{config.get('_path', 'config')}: llm.bits must be one of {list(QUANTIZED_BITS)} "
                              f"(a bitsandbytes NF4 base) or null, got {bits!r}")
    return relative_path(config, value), bits


def recorded_llm(path: str | None, bits: int | None):
    """The run record's `llm`: the path alone for a full-precision base (as records before bits had it)."""
    return {"path": path, "bits": bits} if bits is not None else path


def relative_path(config: dict, value):
    """Paths in a config are relative to the config file."""
    if value is None or str(value) == "smollm2":
        return value
    p = Path(str(value)).expanduser()
    return str(p if p.is_absolute() else Path(config.get("_dir", ".")) / p)


def load_examples(config: dict, split: str):
    from .data import load_conversations, load_scienceqa

    spec = dict((config.get("data") or {}).get(split) or {})
    if not spec:
        raise ConfigError(f"{config.get('_path', 'config')}: data.{split} is not set")
    kind = spec.pop("type", "conversations")
    if kind == "conversations":
        if "path" not in spec:
            raise ConfigError(f"{config.get('_path')}: data.{split}.path is required")
        root = spec.get("image_root")
        return load_conversations(relative_path(config, spec["path"]), relative_path(config, root) if root else None)
    if "root" not in spec:
        raise ConfigError(f"{config.get('_path')}: data.{split}.root is required for scienceqa")
    spec["root"] = relative_path(config, spec["root"])
    if spec.get("image_dir"):
        spec["image_dir"] = relative_path(config, spec["image_dir"])
    return load_scienceqa(**spec)


def vision_spec(config: dict) -> dict:
    spec = dict(config.get("vision") or {"type": "efficientnet-lite0"})
    if spec.get("type") in ("hf", "blip2-qformer") and "path" in spec:
        spec["path"] = relative_path(config, spec["path"])
    return spec


def build_formatter(tokenizer, model, encoder, prompt: dict):
    from .data import PromptFormatter

    mm = model.multimodal
    return PromptFormatter(tokenizer, image_token_id=mm.image_token_id,
                           image_tokens=encoder.num_tokens if mm.image_token_id is not None else 0,
                           prompt_format=prompt.get("format", "chat"), system=prompt.get("system"),
                           max_length=prompt.get("max_length", 512))


def pixel_lookup(encoder, examples):
    """The lookup for a method that trains inside the vision tower (`MultimodalAdapter.takes_pixels`): image
    identity -> the encoder's preprocessed images, read from their files on each call (features cannot be
    cached while the tower's adapters train)."""
    sources = _image_sources(examples)
    return lambda keys: encoder.preprocess([_read_image(sources[key]) for key in keys])


def _image_sources(examples) -> dict[str, object]:
    """Image identity -> its source (path or in-memory image), naming the examples' images on the way."""
    from .vision import image_identity

    sources: dict[str, object] = {}
    for ex in examples:
        if not ex.image_ids:
            ex.image_ids = [image_identity(p) for p in ex.images]
        sources.update(zip(ex.image_ids, ex.images))
    return sources


def _read_image(source):
    from .vision import load_image

    try:
        return load_image(source)
    except Exception as e:
        raise ValueError(f"cannot read image {source}: {e}") from None


def feature_lookup(encoder, examples, cache, say=print):
    """Encode every image of the examples once (cached on disk) and return the lookup the trainer uses."""
    from .vision import FeatureCache

    store = FeatureCache(encoder, cache)
    sources = _image_sources(examples)
    ids = list(sources)
    if ids:
        def load(i):
            return _read_image(sources[ids[i]])

        store.features(ids, load, progress=lambda done, total: say(f"  encoded {done}/{total} images", end="\r"))
        say("")

    def lookup(keys):
        def not_cached(i):
            raise KeyError(f"image {keys[i]!r} was not encoded before training")
        return store.features(keys, not_cached)
    return lookup


def record_run(adapter_dir: Path, config: dict) -> None:
    """Write how to rebuild the model around the adapter (LLM, vision encoder, prompt) next to it, so that
    `pill eval` / `pill generate` need only the adapter directory."""
    cache = config.get("cache_dir")
    run = {"llm": recorded_llm(*llm_spec(config)), "vision": vision_spec(config),
           "prompt": config.get("prompt") or {}, "cache_dir": relative_path(config, cache) if cache else None}
    tmp = adapter_dir / ".pill_run.json.tmp"
    tmp.write_text(json.dumps(run, indent=2))
    os.replace(tmp, adapter_dir / RUN_RECORD)


def inference_settings(adapter: str | os.PathLike, config: dict | None) -> dict:
    """What rebuilds the model around a trained adapter: {llm, bits, vision, prompt, cache}, from the adapter's
    pill_run.json and whatever `config` overrides."""
    adapter_dir = Path(adapter)
    recorded = {}
    if (adapter_dir / RUN_RECORD).is_file():
        recorded = json.loads((adapter_dir / RUN_RECORD).read_text())
    config = config or {}
    llm, bits = llm_spec(config) if "llm" in config else llm_spec({}, recorded.get("llm"))
    vision = vision_spec(config) if "vision" in config else recorded.get("vision")
    if vision is None:
        raise ConfigError(f"{adapter_dir} has no pill_run.json: pass a config naming llm and vision")
    return {"llm": llm, "bits": bits, "vision": vision, "prompt": config.get("prompt") or recorded.get("prompt") or {},
            "cache": relative_path(config, config["cache_dir"]) if config.get("cache_dir")
            else recorded.get("cache_dir")}


def load_for_inference(adapter: str, config: dict | None, *, backend: str | None = None):
    """The model with the adapter loaded (its fused ops on `backend`), the prompt formatter, the vision encoder
    and the feature cache directory, from the adapter's pill_run.json and whatever `config` overrides."""
    import torch

    import pill
    from .llm import load_llm
    from .vision import build_encoder

    adapter_dir = Path(adapter)
    settings = inference_settings(adapter_dir, config)
    llm, bits, prompt, cache = settings["llm"], settings["bits"], settings["prompt"], settings["cache"]
    encoder = build_encoder(settings["vision"])
    model, tokenizer = load_llm(llm, cache=cache, bits=bits)
    model = pill.load_pretrained_adapter(model, adapter_dir, backend=backend)
    if torch.cuda.is_available() and model.device.type != "cuda":  # a 4-bit base is placed when it loads
        model.cuda()
    encoder = model.multimodal.feature_encoder(encoder)  # e.g. with LaVIN's vision routers inside the tower
    formatter = build_formatter(tokenizer, model, encoder, prompt)
    return model, formatter, encoder, cache
