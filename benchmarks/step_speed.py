"""Training-step speed of the demo's model against its floors, in one run (CPU; a GPU when one is there).

    python benchmarks/step_speed.py [--threads 1] [--methods pill lavin llama_adapter_v2] [--family qwen3]
                                    [--json out.json]

Model: SmolLM2-135M's shape (30 layers, hidden 576, GQA 9/3 heads, FFN 1536, vocabulary 49152, tied
embeddings), random weights (the speed is the same, no download); batch 16 x 64 tokens with 4 image tokens per
row, the loss on the last 8 tokens, as in `pill demo`. `--family` builds that shape as another family's block
with its features on (`FAMILY_BLOCKS`: Mistral with a 32-token sliding window, Qwen2's q/k/v biases, Qwen3's
per-head q/k norms), so that each family's cost in the method layers reads against the same base. Rows:

- the frozen base without adapters, gradients flowing to the input embeddings: the floor of any method with
  adapters in every layer (fp32, and bf16 weights); with bf16 weights also with an fp32 residual stream (the
  methods' precision recipe without their adapters: bf16 projections, fp32 residual adds and norms);
- each method's step (forward, backward, AdamW on the adapters) on the eager and cpp backends, with the base in
  fp32 and in bf16 (`pill.set_compute_dtype`: bf16 base, fp32 adapters, autocast);
- the bf16 GEMM floor: the step's matmul FLOPs (counted with torch.utils.flop_counter on the frozen-base step)
  divided by the measured rate of a bf16 GEMM of the model's shape.

Every step uses the LM head on the supervised positions only (logits_to_keep="supervised"). Medians of
--repeats steps after one warm-up step, each row in a fresh Python process (--in-process: all in this one; rows
measured one after another in one process depended on what ran before them).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pill  # noqa: E402
import pill_kernels as pk  # noqa: E402
from pill.machine import choose_attention_dtype, gemm_seconds  # noqa: E402

SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048)
TINY = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, tie_word_embeddings=True, max_position_embeddings=256)
# Each family's block at the same shape, its features on: a window shorter than the 64-token rows, Qwen2's
# biases (always there), Qwen3's per-head norms over its own head_dim (64, SmolLM2's).
FAMILY_BLOCKS = {"llama": (LlamaConfig, LlamaForCausalLM, {}),
                 "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": 32}),
                 "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"use_sliding_window": False}),
                 "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 64, "use_sliding_window": False})}
STAGE = {"pill": 2, "lavin": 1, "llama_adapter_v2": 1}  # the demo's longest phase of each method
FP32_RESIDUAL = "(fp32 residual stream)"
IMAGE_TOKENS, SUPERVISED = 4, 8  # per row, as in `pill demo`


def vision_dim_of(args) -> int:
    return 16 if args.tiny else 1280


def _sdpa_in_fp32(module, query, key, value, attention_mask, **kwargs):
    """transformers' sdpa attention computed in fp32 (inputs cast in, output cast back), as the pill layers do
    with an fp32 attention dtype: gives the frozen-base row the same attention as the method rows."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cast = lambda t: t.float() if t is not None and t.is_floating_point() else t  # noqa: E731
    with torch.autocast("cpu", enabled=False):
        out, weights = sdpa_attention_forward(module, cast(query), cast(key), cast(value), cast(attention_mask),
                                              **kwargs)
    return out.to(query.dtype), weights


def build_base(size: dict, seed: int = 0, attention: str = "sdpa", family: str = "llama"):
    torch.manual_seed(seed)
    if attention == "sdpa_fp32":
        from transformers import AttentionInterface

        AttentionInterface.register("sdpa_fp32", _sdpa_in_fp32)
    config_class, model_class, features = FAMILY_BLOCKS[family]
    model = model_class(config_class(attn_implementation=attention, **size, **features))
    model.requires_grad_(False)
    return model


def inputs(config, batch: int, seq: int, image_tokens: int, supervised: int, vision_dim: int, placeholders: bool):
    gen = torch.Generator().manual_seed(1)
    image_token = config.vocab_size  # outside the vocabulary, as the demo's
    ids = torch.randint(3, config.vocab_size, (batch, seq), generator=gen)
    labels = torch.full_like(ids, -100)
    labels[:, -supervised:] = ids[:, -supervised:]
    if placeholders:
        ids[:, 2:2 + image_tokens] = image_token
        features = torch.randn(batch * 1, image_tokens, vision_dim, generator=gen)
    else:
        features = torch.randn(batch, image_tokens, vision_dim, generator=gen)
    return ids, labels, features, image_token


def median_seconds(step, repeats: int) -> float:
    step()  # warm-up: allocations, autotuning, first-touch
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def frozen_base_step(model, ids, labels, fp32_residual: bool = False):
    """Forward and backward of the frozen base to the input embeddings, the LM head on supervised positions. A
    half-precision base computes the LM head in fp32 from an fp32 copy of its weight, as the methods do
    (`pill.model.FullPrecisionLinear`). `fp32_residual`: the decoder layers run under autocast on fp32 input
    embeddings, so that the residual stream stays fp32 while the projections run in the weights' dtype: the
    methods' precision recipe (`pill.set_compute_dtype`) without their adapters."""
    head = model.lm_head.weight
    head = head.float() if head.dtype in (torch.bfloat16, torch.float16) else head
    device = head.device.type

    def step():
        embeds = model.get_input_embeddings()(ids.clamp(max=model.config.vocab_size - 1)).detach()
        if fp32_residual:
            embeds = embeds.float()
        embeds.requires_grad_(True)
        with torch.autocast(device, dtype=model.dtype, enabled=fp32_residual):
            hidden = model.model(inputs_embeds=embeds, use_cache=False).last_hidden_state
        supervised = labels[:, 1:] != -100
        logits = torch.nn.functional.linear(hidden[:, :-1][supervised].to(head.dtype), head)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels[:, 1:][supervised])
        loss.backward()
        return loss
    return step


def method_step(model, ids, labels, features, extra):
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)

    def step():
        loss = model(input_ids=ids, image_features=features, labels=labels, logits_to_keep="supervised",
                     use_cache=False, **extra).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss
    return step


def inject(method: str, base, image_token: int, vision_dim: int):
    spec = pill.methods.get_method(method)
    config = spec.config_class(**spec.demo_config)
    model = spec.inject(base, config, vision_dim=vision_dim,
                        image_token_id=image_token if spec.image_placeholders else None)
    pill.set_stage(model, STAGE[method])
    return model, spec


def measure_row(spec: dict, size: dict, args) -> tuple[float | None, str | None]:
    """(median seconds, None) of one row's step, or (None, why it cannot run)."""
    vision_dim, image_tokens, supervised = vision_dim_of(args), IMAGE_TOKENS, SUPERVISED
    dtype, attention = getattr(torch, spec["dtype"]), getattr(torch, spec["attention"])
    config = LlamaConfig(**size)
    if spec["step"].startswith("frozen base"):
        fp32_attention = attention == torch.float32 and dtype != torch.float32
        model = build_base(size, attention="sdpa_fp32" if fp32_attention else "sdpa", family=args.family).to(dtype)
        ids, labels, _, _ = inputs(config, args.batch, args.seq, image_tokens, supervised, vision_dim, True)
        step = frozen_base_step(model, ids, labels, fp32_residual=spec["step"].endswith(FP32_RESIDUAL))
        return median_seconds(step, args.repeats), None
    model, spec_ = inject(spec["method"], build_base(size, family=args.family), config.vocab_size, vision_dim)
    pill.set_compute_dtype(model, dtype, attention)
    pill.set_kernel_backend(model, spec["backend"])
    ids, labels, features, _ = inputs(config, args.batch, args.seq, image_tokens, supervised, vision_dim,
                                      spec_.image_placeholders)
    extra = {} if spec_.image_placeholders else {"sequence_modality": torch.ones(args.batch, dtype=bool)}
    try:
        return median_seconds(method_step(model, ids, labels, features, extra), args.repeats), None
    except pk.BackendUnavailableError as e:  # e.g. LLaMA-Adapter V2's only fused op has no cpp kernel
        return None, str(e)


def measure_row_isolated(spec: dict, argv: list[str]) -> tuple[float | None, str | None]:
    """measure_row in a fresh Python process: rows measured one after another in one process were seen to
    depend on what ran before them (a frozen-base step 0.4 s slower after the other rows than alone)."""
    done = subprocess.run([sys.executable, __file__, *argv, "--row", json.dumps(spec)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {spec} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["seconds"], result["skipped"]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    parser.add_argument("--methods", nargs="+", default=list(STAGE), choices=list(STAGE))
    parser.add_argument("--backends", nargs="+", default=["eager", "cpp"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model (a smoke test of this script)")
    parser.add_argument("--family", default="llama", choices=list(FAMILY_BLOCKS),
                        help="the base's block: SmolLM2's shape as this family's, its features on")
    parser.add_argument("--json", default=None)
    parser.add_argument("--in-process", action="store_true",
                        help="measure every row in this process (default: each in a fresh process)")
    parser.add_argument("--row", default=None, help=argparse.SUPPRESS)  # one row, for measure_row_isolated
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = TINY if args.tiny else SMOLLM2
    if args.row is not None:
        seconds, skipped = measure_row(json.loads(args.row), size, args)
        print(json.dumps({"seconds": seconds, "skipped": skipped}))
        return {}
    vision_dim, image_tokens, supervised = vision_dim_of(args), IMAGE_TOKENS, SUPERVISED
    dtypes = {name: getattr(torch, name) for name in args.dtypes}
    meta = {"threads": torch.get_num_threads(), "torch": torch.__version__, "batch": args.batch,
                      "seq": args.seq, "supervised": supervised, "image_tokens": image_tokens,
                      "model": ("tiny" if args.tiny else "SmolLM2-135M shape") + f", {args.family} block",
                      "family": args.family, "repeats": args.repeats}

    gemm = {name: gemm_seconds(1024, size["hidden_size"], size["intermediate_size"], dtype)
            for name, dtype in dtypes.items()}
    flops_per_gemm = 2 * 1024 * size["hidden_size"] * size["intermediate_size"]
    meta["gemm_GFLOPs"] = {name: round(flops_per_gemm / t / 1e9, 1) for name, t in gemm.items()}

    base = build_base(size, family=args.family)
    ids, labels, _, _ = inputs(base.config, args.batch, args.seq, image_tokens, supervised, vision_dim, True)
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        frozen_base_step(base, ids, labels)()
    step_flops = counter.get_total_flops()
    meta["step_flops"] = step_flops
    meta["step_GFLOP"] = round(step_flops / 1e9, 2)
    floor_dtype = "bfloat16" if "bfloat16" in gemm else next(iter(gemm))
    floor = step_flops / (flops_per_gemm / gemm[floor_dtype])
    attention_dtypes = {name: choose_attention_dtype(base, dtype) for name, dtype in dtypes.items()}
    meta["attention"] = {name: why for name, (_, why) in attention_dtypes.items()}
    meta["isolated"] = not args.in_process
    specs = []
    for name, dtype in dtypes.items():
        attention = str(attention_dtypes[name][0]).removeprefix("torch.")
        specs.append({"step": "frozen base", "dtype": name, "attention": attention, "backend": "-"})
        if attention != name:  # also transformers' model as it is, attention in the base's dtype
            specs.append({"step": "frozen base (transformers as is)", "dtype": name, "attention": name,
                          "backend": "-"})
        if dtype != torch.float32:  # the methods' recipe without adapters: the floor under their precision
            specs.append({"step": f"frozen base {FP32_RESIDUAL}", "dtype": name, "attention": attention,
                          "backend": "-"})
    specs += [{"step": f"{method} stage {STAGE[method]}", "method": method, "dtype": name, "backend": backend,
               "attention": str(attention_dtypes[name][0]).removeprefix("torch.")}
              for method in args.methods for name in dtypes for backend in args.backends]
    del base
    rows, frozen = [], {}
    for spec in specs:
        seconds, skipped = measure_row(spec, size, args) if args.in_process else measure_row_isolated(spec, argv)
        if skipped:
            print(f"skipped {spec['step']} on {spec['backend']}: {skipped}", file=sys.stderr, flush=True)
            continue
        print(f"{spec['step']} {spec['dtype']} {spec['backend']}: {seconds:.3f} s", file=sys.stderr, flush=True)
        row = {k: v for k, v in spec.items() if k != "method"}
        rows.append({**row, "median_s": seconds})
        if spec["step"] == "frozen base":
            frozen[spec["dtype"]] = seconds
    for row in rows:
        row["vs_frozen_base"] = round(row["median_s"] / frozen[row["dtype"]], 2)
        row["vs_bf16_floor"] = round(row["median_s"] / floor, 2)
        row["median_s"] = round(row["median_s"], 3)
    result = {"meta": meta, "bf16_gemm_floor_s": round(floor, 3), "rows": rows}
    print(f"# training step, {meta['model']}, batch {args.batch} x {args.seq}, loss on the last {supervised}, "
          f"{meta['threads']} thread(s), torch {torch.__version__}")
    print(f"GEMM 1024x{size['hidden_size']} @ {size['hidden_size']}x{size['intermediate_size']}: "
          + ", ".join(f"{k} {v} GFLOP/s" for k, v in meta["gemm_GFLOPs"].items())
          + f"; step {meta['step_GFLOP']} GFLOP of matmuls; bf16 GEMM floor {floor:.3f} s\n")
    print("| step | base dtype | attention | backend | median (s) | / frozen base (same dtype) | / bf16 GEMM floor |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['step']} | {row['dtype']} | {row['attention']} | {row['backend']} | {row['median_s']} | "
              f"{row['vs_frozen_base']}x | {row['vs_bf16_floor']}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
