"""The `pill` command: demo, train, eval, generate.

    pill demo [--method pill|lavin|llama_adapter_v2]     offline two-stage demo on handwritten digits
    pill train CONFIG.yaml [--resume]                    one training stage from a YAML / JSON config
    pill eval CONFIG.yaml --adapter DIR                  multiple-choice accuracy on the config's eval data
    pill generate --adapter DIR --image IMG --question Q answer a question about an image

A run config (YAML or JSON; unknown keys are refused, naming the key):

    llm: path/to/hf-llama-dir | model.gguf | smollm2
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

import argparse
import json
import os
import sys
from pathlib import Path

TOP_KEYS = {"llm", "vision", "method", "method_config", "init_adapter", "prompt", "data", "train", "eval",
            "cache_dir"}
PROMPT_KEYS = {"format", "system", "max_length"}
EVAL_KEYS = {"batch_size", "max_new_tokens"}
DATA_KEYS = {"conversations": {"type", "path", "image_root"},
             "scienceqa": {"type", "root", "split", "limit", "problems_file", "splits_file", "image_dir"}}


class ConfigError(ValueError):
    pass


def _check_keys(mapping, allowed: set, where: str) -> dict:
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
    config = _check_keys(config, TOP_KEYS, str(path))
    _check_keys(config.get("prompt"), PROMPT_KEYS, f"{path}: prompt")
    _check_keys(config.get("eval"), EVAL_KEYS, f"{path}: eval")
    data = _check_keys(config.get("data"), {"train", "eval"}, f"{path}: data")
    for split, spec in data.items():
        spec = _check_keys(spec, set().union(*DATA_KEYS.values()), f"{path}: data.{split}")
        kind = spec.get("type", "conversations")
        if kind not in DATA_KEYS:
            raise ConfigError(f"{path}: data.{split}.type must be one of {sorted(DATA_KEYS)}, got {kind!r}")
        _check_keys(spec, DATA_KEYS[kind], f"{path}: data.{split} ({kind})")
    config["_path"] = str(path)
    config["_dir"] = str(path.parent)
    return config


def _relative(config: dict, value):
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
        return load_conversations(_relative(config, spec["path"]), _relative(config, root) if root else None)
    if "root" not in spec:
        raise ConfigError(f"{config.get('_path')}: data.{split}.root is required for scienceqa")
    spec["root"] = _relative(config, spec["root"])
    if spec.get("image_dir"):
        spec["image_dir"] = _relative(config, spec["image_dir"])
    return load_scienceqa(**spec)


def vision_spec(config: dict) -> dict:
    spec = dict(config.get("vision") or {"type": "efficientnet-lite0"})
    if spec.get("type") == "hf" and "path" in spec:
        spec["path"] = _relative(config, spec["path"])
    return spec


def build_formatter(tokenizer, model, encoder, prompt: dict):
    from .data import PromptFormatter

    mm = model.multimodal
    return PromptFormatter(tokenizer, image_token_id=mm.image_token_id,
                           image_tokens=encoder.num_tokens if mm.image_token_id is not None else 0,
                           prompt_format=prompt.get("format", "chat"), system=prompt.get("system"),
                           max_length=prompt.get("max_length", 512))


def feature_lookup(encoder, examples, cache, say=print):
    """Encode every image of the examples once (cached on disk) and return the lookup the trainer uses."""
    from .vision import FeatureCache, image_identity, load_image

    store = FeatureCache(encoder, cache)
    sources: dict[str, object] = {}
    for ex in examples:
        if not ex.image_ids:
            ex.image_ids = [image_identity(p) for p in ex.images]
        sources.update(zip(ex.image_ids, ex.images))
    ids = list(sources)
    if ids:
        def load(i):
            try:
                return load_image(sources[ids[i]])
            except Exception as e:
                raise ValueError(f"cannot read image {sources[ids[i]]}: {e}") from None

        store.features(ids, load, progress=lambda done, total: say(f"  encoded {done}/{total} images", end="\r"))
        say("")

    def lookup(keys):
        def not_cached(i):
            raise KeyError(f"image {keys[i]!r} was not encoded before training")
        return store.features(keys, not_cached)
    return lookup


def _say(*args, end="\n"):
    print(*args, end=end, flush=True)


def _init_distributed():
    """Under torchrun (WORLD_SIZE > 1): one process group, gloo on CPU, nccl on GPUs; returns (rank, world)."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return torch.distributed.get_rank(), world


def cmd_train(args) -> int:
    import torch

    import pill
    from .llm import cache_dir, load_llm
    from .trainer import TrainConfig, Trainer
    from .vision import build_encoder

    config = load_run_config(args.config)
    train_cfg = dict(config.get("train") or {})
    if "output_dir" in train_cfg:
        train_cfg["output_dir"] = _relative(config, train_cfg["output_dir"])
    if args.output_dir:
        train_cfg["output_dir"] = args.output_dir
    try:
        tconfig = TrainConfig.from_dict(train_cfg)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{config['_path']}: {e}") from None
    rank, world = _init_distributed()
    torch.manual_seed(tconfig.seed)
    examples = load_examples(config, "train")  # data errors surface before any model is loaded
    cache = cache_dir(_relative(config, config.get("cache_dir")))
    encoder = build_encoder(vision_spec(config))
    lookup = feature_lookup(encoder, examples, cache)
    model, tokenizer = load_llm(_relative(config, config.get("llm")), cache=cache)
    method = config.get("method", "pill")
    if method not in pill.config.METHOD_CONFIGS:
        raise ConfigError(f"{config['_path']}: method must be one of {sorted(pill.config.METHOD_CONFIGS)}, "
                          f"got {method!r}")
    try:
        method_config = pill.config.METHOD_CONFIGS[method].from_dict(config.get("method_config") or {})
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{config['_path']}: method_config: {e}") from None
    image_token_id = max(model.config.vocab_size, len(tokenizer))
    if method == "pill":
        model = pill.inject_pill(model, method_config, vision_dim=encoder.feature_dim, image_token_id=image_token_id)
    elif method == "lavin":
        model = pill.inject_lavin(model, method_config, vision_dim=encoder.feature_dim, image_token_id=image_token_id)
    else:
        model = pill.inject_llama_adapter_v2(model, method_config, vision_dim=encoder.feature_dim)
    if config.get("init_adapter"):
        pill.load_adapter(model, _relative(config, config["init_adapter"]), set_saved_stage=False)
    if torch.cuda.is_available():
        model.cuda()
    formatter = build_formatter(tokenizer, model, encoder, config.get("prompt") or {})
    trainer = Trainer(model, formatter, examples, tconfig, features=lookup)
    if rank != 0:
        tconfig.progress = False
        metrics = trainer.train(resume=args.resume)
        torch.distributed.destroy_process_group()
        return 0
    _say(pill.trainable_parameter_report(model))
    if world > 1:
        _say(trainer.distributed_report())
    _say(f"{world} processes; " if world > 1 else "", end="")
    _say(f"training stage {tconfig.stage}: {len(examples)} examples, {trainer.total_steps} steps, lr {trainer.lr:.3g}, "
         f"output {tconfig.output_dir}")
    metrics = trainer.train(resume=args.resume)
    _record_run(Path(tconfig.output_dir) / "adapter", config)
    if world > 1:
        torch.distributed.destroy_process_group()
    _say(f"done: step {trainer.step}, recent loss {metrics.get('recent_loss')}; adapter in "
         f"{Path(tconfig.output_dir) / 'adapter'}")
    return 0


def _record_run(adapter_dir: Path, config: dict) -> None:
    """Write how to rebuild the model around the adapter (LLM, vision encoder, prompt) next to it, so that
    `pill eval` / `pill generate` need only the adapter directory."""
    cache = config.get("cache_dir")
    run = {"llm": _relative(config, config.get("llm")), "vision": vision_spec(config),
           "prompt": config.get("prompt") or {}, "cache_dir": _relative(config, cache) if cache else None}
    tmp = adapter_dir / ".pill_run.json.tmp"
    tmp.write_text(json.dumps(run, indent=2))
    os.replace(tmp, adapter_dir / "pill_run.json")


def load_for_inference(adapter: str, config: dict | None):
    import torch

    import pill
    from .llm import load_llm
    from .vision import build_encoder

    adapter_dir = Path(adapter)
    recorded = {}
    if (adapter_dir / "pill_run.json").is_file():
        recorded = json.loads((adapter_dir / "pill_run.json").read_text())
    config = config or {}
    llm = _relative(config, config["llm"]) if "llm" in config else recorded.get("llm")
    vision = vision_spec(config) if "vision" in config else recorded.get("vision")
    prompt = config.get("prompt") or recorded.get("prompt") or {}
    cache = _relative(config, config["cache_dir"]) if config.get("cache_dir") else recorded.get("cache_dir")
    if vision is None:
        raise ConfigError(f"{adapter_dir} has no pill_run.json: pass a config naming llm and vision")
    encoder = build_encoder(vision)
    model, tokenizer = load_llm(llm, cache=cache)
    model = pill.load_pretrained_adapter(model, adapter_dir)
    if torch.cuda.is_available():
        model.cuda()
    formatter = build_formatter(tokenizer, model, encoder, prompt)
    return model, formatter, encoder, cache


def cmd_eval(args) -> int:
    from .evaluate import evaluate_multiple_choice, format_report
    from .llm import cache_dir

    config = load_run_config(args.config)
    examples = load_examples(config, "eval")
    model, formatter, encoder, cache = load_for_inference(args.adapter, config)
    lookup = feature_lookup(encoder, examples, cache_dir(cache))
    opts = config.get("eval") or {}
    result = evaluate_multiple_choice(model, formatter, examples, lookup, batch_size=opts.get("batch_size", 16),
                                      max_new_tokens=opts.get("max_new_tokens", 64), progress=not args.no_progress)
    _say(format_report(result, "multiple-choice accuracy"))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2))
        _say(f"predictions written to {args.output}")
    return 0


def cmd_generate(args) -> int:
    from .data import Example
    from .evaluate import generate_answers
    from .llm import cache_dir
    from .vision import FeatureCache, image_identity, load_image

    config = load_run_config(args.config) if args.config else None
    model, formatter, encoder, cache = load_for_inference(args.adapter, config)
    image = Path(args.image)
    if not image.is_file():
        raise FileNotFoundError(f"--image: file not found: {image}")
    question = args.question if "<image>" in args.question else "<image>\n" + args.question
    example = Example([{"role": "user", "content": question}, {"role": "assistant", "content": ""}],
                      [image], [image_identity(image)], where=str(image))
    store = FeatureCache(encoder, cache_dir(cache))
    lookup = lambda ids: store.features(ids, lambda i: load_image(image))  # noqa: E731
    answer = generate_answers(model, formatter, [example], lookup, max_new_tokens=args.max_new_tokens)[0]
    _say(answer)
    return 0


def cmd_demo(args) -> int:
    from .demo import METHOD_DEFAULTS, DemoSettings, run_demo

    values = dict(METHOD_DEFAULTS.get(args.method, {}))
    values["method"] = args.method
    for name in ("train_images", "test_images", "stage1_steps", "stage2_steps", "batch_size", "seed", "threads"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    if args.no_base_eval:
        values["base_eval"] = False
    result = run_demo(DemoSettings(**values), llm=args.llm, cache=args.cache_dir, output_dir=args.output_dir,
                      progress=not args.no_progress)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if result["failures"]:
        print("pill demo failed: " + "; ".join(result["failures"]), file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pill", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="offline two-stage demo: SmolLM2-135M + EfficientNet-Lite0 on digits")
    demo.add_argument("--method", default="pill", choices=["pill", "lavin", "llama_adapter_v2"])
    demo.add_argument("--cache-dir", default=None, help="default $PILL_CACHE_DIR or ~/.cache/pill-kernels")
    demo.add_argument("--output-dir", default=None, help="default <cache>/demo-runs/<method>")
    demo.add_argument("--llm", default=None, help="another LLaMA checkpoint (HF dir or .gguf) instead of SmolLM2")
    for name in ("train-images", "test-images", "stage1-steps", "stage2-steps", "batch-size", "seed"):
        demo.add_argument(f"--{name}", type=int, default=None)
    demo.add_argument("--threads", type=int, default=None,
                      help="CPU threads (default: time 1 vs all cores and keep the faster; matters on shared CPUs)")
    demo.add_argument("--no-base-eval", action="store_true", help="skip the base model's evaluation")
    demo.add_argument("--no-progress", action="store_true")
    demo.add_argument("--json", default=None, help="also write the results to this JSON file")
    demo.set_defaults(func=cmd_demo)

    train = sub.add_parser("train", help="train one stage from a YAML / JSON config")
    train.add_argument("config")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    train.add_argument("--output-dir", default=None, help="override train.output_dir")
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="multiple-choice accuracy of an adapter on the config's data.eval")
    ev.add_argument("config")
    ev.add_argument("--adapter", required=True)
    ev.add_argument("--output", default=None, help="write accuracy, categories and predictions as JSON")
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(func=cmd_eval)

    gen = sub.add_parser("generate", help="answer a question about an image with a trained adapter")
    gen.add_argument("--adapter", required=True)
    gen.add_argument("--image", required=True)
    gen.add_argument("--question", required=True)
    gen.add_argument("--config", default=None, help="a run config (llm, vision, prompt), if the adapter lacks one")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.set_defaults(func=cmd_generate)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .data import DataError

    try:
        return args.func(args)
    except (ConfigError, DataError, FileNotFoundError, FileExistsError) as e:
        print(f"pill {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
