"""Peak memory of a training step for each method: full-precision vs 4-bit NF4 frozen base, with and without
gradient checkpointing (issue 28, LaVIN-lite's "--bits 4bit --gradient_checkpointing").

    python benchmarks/training_memory.py                              # CPU: the LLaMA-3.2-1B shape, peak RSS
    python benchmarks/training_memory.py --device cuda --shape llama-7b   # a GPU: torch.cuda.max_memory_allocated

Model: random weights of the named shape (no download; memory does not depend on the values); batch 4 x 512 tokens
with 32 image tokens per row (precomputed CLIP ViT-L/14 features, 1024 wide; the frozen vision encoder is not
counted), the loss on the last 128 tokens of each row, the LM head on those positions only. Each method in its
seed configuration at the stage that trains the most (PILL stage 2, LaVIN, LLaMA-Adapter V2 stage 2), AdamW on
the adapters. The full-precision base is fp32 on the CPU and bf16 on a GPU (`pill.set_compute_dtype`); the 4-bit
base computes in the same dtype. The 4-bit base is built here by replacing the decoder's projections with
bitsandbytes' `Linear4bit` (NF4, no double quantization: what `pill.llm.load_llm(bits=4)` loads; the test of this
script checks the two agree) so that a 7B shape needs no checkpoint on disk.

What is measured: one optimizer step with AdamW's state already there (made by a step on zero gradients), after
the model and inputs are built:
- CPU: the process's peak resident set (VmHWM, reset through /proc/self/clear_refs before the step), each row
  in a fresh process; "before" is the process's RSS before the step (weights, optimizer state, Python, torch).
- CUDA: torch.cuda.max_memory_allocated during the step (reset before), and memory_allocated before it.
"""
from __future__ import annotations

import argparse
import gc
import json
import re
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pill  # noqa: E402

SHAPES = {
    # LLaMA-3.2-1B: GQA 32/8 heads, tied embeddings, 128k vocabulary.
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    # LLaMA-1/2-7B and 13B, the seeds' bases (LaVIN-7B-lite: 9 GB, 13B-lite: 14 GB).
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
    "llama-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                      num_key_value_heads=40, vocab_size=32000, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True),
}
STAGE = {"pill": 2, "lavin": 1, "llama_adapter_v2": 2}  # the stage that trains the most parameters
VISION_DIM, IMAGE_TOKENS = 1024, 32
MiB = 2 ** 20


def quantize_layer_to_nf4(layer: nn.Module, compute_dtype: torch.dtype) -> None:
    """`layer`'s nn.Linear projections replaced by bitsandbytes' NF4 `Linear4bit` on the weights' device, as
    transformers' `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")` loads them (blocksize 64,
    no double quantization), one at a time, so that each full-precision weight goes as its packed copy comes."""
    import bitsandbytes as bnb

    for parent in list(layer.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            packed = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                       compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=False,
                                       device="meta")
            packed.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                              compress_statistics=False, module=packed).to(child.weight.device)
            if child.bias is not None:
                packed.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, packed)
            del child


def quantize_to_nf4(model: LlamaForCausalLM, compute_dtype: torch.dtype) -> LlamaForCausalLM:
    """The decoder layers' projections in NF4 (embeddings, norms and LM head stay as they are, as transformers
    leaves them)."""
    for layer in model.model.layers:
        quantize_layer_to_nf4(layer, compute_dtype)
    return model


def build_base(shape: dict, device: str, base: str, dtype: torch.dtype) -> LlamaForCausalLM:
    """A LLaMA of `shape` with random weights in `dtype` on `device`, its decoder's projections in NF4 for
    base="4bit". Made on the meta device and materialized one module at a time, each decoder layer quantized as
    soon as it exists: a 4-bit 13B base never holds its full-precision weights at once (transformers' loader
    quantizes shard by shard the same way), and no heap from a larger model stays resident."""
    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=4096, **shape)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.requires_grad_(False)
    inner = model.model
    with torch.device(device):  # the rotary tables are computed from the config, not drawn
        inner.rotary_emb = type(inner.rotary_emb)(config)
    heads = [] if config.tie_word_embeddings else [model.lm_head]
    with torch.no_grad():
        for module in [inner.embed_tokens, inner.norm, *heads, *inner.layers]:
            module.to_empty(device=device)
            for p in module.parameters():
                p.normal_(0.0, config.initializer_range) if p.dim() > 1 else p.fill_(1.0)
            if base == "4bit" and module in inner.layers:
                quantize_layer_to_nf4(module, dtype)
    if config.tie_word_embeddings:
        model.lm_head.weight = inner.embed_tokens.weight
    gc.collect()
    return model


def batch_inputs(config, batch: int, seq: int, supervised: int, device: str, placeholders: bool):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, config.vocab_size, (batch, seq), generator=gen)
    labels = torch.full_like(ids, -100)
    labels[:, -supervised:] = ids[:, -supervised:]
    features = torch.randn(batch, IMAGE_TOKENS, VISION_DIM, generator=gen)
    if placeholders:
        ids[:, 1:1 + IMAGE_TOKENS] = config.vocab_size  # the image token, outside the vocabulary as the demo's
        labels[:, 1:1 + IMAGE_TOKENS] = -100
    return ids.to(device), labels.to(device), features.to(device)


def adapted_model(method: str, base: LlamaForCausalLM, dtype: torch.dtype, checkpointing: bool):
    spec = pill.methods.get_method(method)
    vocab = base.config.vocab_size
    model = spec.inject(base, spec.config_class(), vision_dim=VISION_DIM,
                        image_token_id=vocab if spec.image_placeholders else None)
    pill.set_stage(model, STAGE[method])
    pill.set_compute_dtype(model, dtype)
    if checkpointing:
        pill.enable_gradient_checkpointing(model)
    return model, spec


def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


class PeakMemory:
    """Peak memory of what runs inside the `with` block, in bytes: the process's resident set on the CPU,
    the CUDA caching allocator's allocated bytes on a GPU."""

    def __init__(self, device: str):
        self.device = device
        if device == "cpu" and not Path("/proc/self/clear_refs").exists():
            raise SystemExit("training_memory.py: the CPU peak is read from Linux's /proc/self (clear_refs, VmHWM), "
                             "which this system lacks")

    def current(self) -> int:
        if self.device == "cpu":
            return _status_kib("VmRSS") * 1024
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()

    def __enter__(self):
        gc.collect()
        if self.device == "cpu":
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        else:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        self.before = self.current()
        return self

    def __exit__(self, *exc):
        if self.device == "cpu":
            self.peak = _status_kib("VmHWM") * 1024
        else:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()


def measure_row(row: dict, args) -> dict:
    device, dtype = args.device, getattr(torch, args.dtype)
    if device == "cuda" and torch.cuda.memory_allocated() > 64 * MiB:
        print(f"warning: {torch.cuda.memory_allocated() / MiB:.0f} MiB still allocated from an earlier row; this "
              f"row's peak includes it", file=sys.stderr)
    base = build_base(SHAPES[args.shape], device, row["base"], dtype)
    model, spec = adapted_model(row["method"], base, dtype, row["checkpointing"])
    ids, labels, features = batch_inputs(base.config, args.batch, args.seq, args.supervised, device,
                                         spec.image_placeholders)
    extra = {} if spec.image_placeholders else {"sequence_modality": torch.ones(args.batch, dtype=bool,
                                                                                 device=device)}
    trainable = list(model.trainable_parameters())
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    frozen_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    frozen_bytes += sum(p.quant_state.absmax.nbytes for p in model.parameters()  # NF4's per-block scales
                        if getattr(p, "quant_state", None) is not None)
    # AdamW's state exists from the first step on; made here by a step on zero gradients, so that the one
    # measured step is a steady-state step without paying for a second one.
    for p in trainable:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.train()
    with PeakMemory(device) as memory:
        loss = model(input_ids=ids, image_features=features, labels=labels, logits_to_keep="supervised",
                     use_cache=False, **extra).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if not torch.isfinite(loss):
        raise RuntimeError(f"{row}: a non-finite loss {loss.item()}")
    return {**row, "peak_MiB": round(memory.peak / MiB), "before_MiB": round(memory.before / MiB),
            "frozen_weights_MiB": round(frozen_bytes / MiB, 1),
            "trainable_params_M": round(sum(p.numel() for p in trainable) / 1e6, 2),
            "loss": round(loss.item(), 4)}


def measure_row_isolated(row: dict, argv: list[str]) -> dict:
    """measure_row in a fresh Python process: a process's peak resident set cannot be given back to it."""
    done = subprocess.run([sys.executable, __file__, *argv, "--row", json.dumps(row)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {row} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shape", default="llama-3.2-1b", choices=list(SHAPES))
    parser.add_argument("--dtype", default=None, help="the base's compute dtype (cpu: float32, cuda: bfloat16)")
    parser.add_argument("--methods", nargs="+", default=list(STAGE), choices=list(STAGE))
    parser.add_argument("--bases", nargs="+", default=["full", "4bit"], choices=["full", "4bit"])
    parser.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--supervised", type=int, default=128, help="tokens with a loss, at the end of each row")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--in-process", action="store_true",
                        help="every row in this process (the default on CUDA, where the allocator's peak resets)")
    parser.add_argument("--row", default=None, help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("training_memory.py --device cuda: torch sees no CUDA device here")
    if args.row is not None:
        print(json.dumps(measure_row(json.loads(args.row), args)))
        return {}
    meta = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "shape": args.shape,
            "dtype": args.dtype, "batch": args.batch, "seq": args.seq, "supervised": args.supervised,
            "image_tokens": IMAGE_TOKENS, "vision_dim": VISION_DIM, "torch": torch.__version__,
            "measure": "peak RSS of the process" if args.device == "cpu" else "torch.cuda.max_memory_allocated"}
    in_process = args.in_process or args.device == "cuda"
    rows = []
    for method in args.methods:
        for base in args.bases:
            for checkpointing in args.checkpointing:
                row = {"method": method, "stage": STAGE[method], "base": base, "checkpointing": checkpointing == "on"}
                result = measure_row(row, args) if in_process else measure_row_isolated(row, argv)
                print(f"{method} {base} checkpointing={checkpointing}: peak {result['peak_MiB']} MiB",
                      file=sys.stderr, flush=True)
                rows.append(result)
                if args.json:  # row by row: a run cut short (a GPU session's time limit) keeps what it measured
                    Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
                gc.collect()
                if args.device == "cuda":
                    torch.cuda.empty_cache()
    full = {(r["method"], r["checkpointing"]): r["peak_MiB"] for r in rows if r["base"] == "full"}
    for r in rows:
        reference = full.get((r["method"], False))
        r["vs_full_no_checkpointing"] = round(r["peak_MiB"] / reference, 2) if reference else None
    print(f"# peak memory of a training step: {args.shape} shape, {meta['device']}, base {args.dtype} or 4-bit NF4, "
          f"batch {args.batch} x {args.seq} ({IMAGE_TOKENS} image tokens, loss on the last {args.supervised}), "
          f"{meta['measure']}, torch {torch.__version__}\n")
    print("| method (stage) | base | checkpointing | frozen weights (MiB) | before the step (MiB) | peak (MiB) "
          "| / full base without checkpointing |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['vs_full_no_checkpointing']}x" if r["vs_full_no_checkpointing"] else "-"
        base = args.dtype if r["base"] == "full" else "4-bit NF4"
        print(f"| {r['method']} ({r['stage']}) | {base} | {'on' if r['checkpointing'] else 'off'} | "
              f"{r['frozen_weights_MiB']} | {r['before_MiB']} | {r['peak_MiB']} | {ratio} |")
    result = {"meta": meta, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
