"""Padded vs packed training steps at a ScienceQA-like length distribution (CPU; a GPU when one is there).

    python benchmarks/packing_speed.py [--threads 1 2] [--methods pill] [--lengths scienceqa demo] [--json out.json]

Each row is one method's training step (forward, backward, AdamW on the adapters; the LM head on the supervised
positions only) over the same micro-batches of `--batch` examples, collated two ways: left-padded to the longest
example of the batch (`pill.data.Collator`) and packed into rows of at most `--max-length` tokens
(`pill.packing.PackedCollator`). Reported: median step time, real (non-padding) and supervised tokens per
second, the padding share of the computed tokens, and the peak memory the step adds (CPU: the process's peak
RSS over the loaded model, each configuration in its own process; GPU: max_memory_allocated).

Model: SmolLM2-135M's shape (hidden 576, GQA 9/3 heads, FFN 1536, vocabulary 49152, tied embeddings) with
`--layers` layers (default 8: the ratio packed/padded does not depend on depth, and 8 keeps a CPU run to a few
minutes; 30 is the real model), random weights. `--size llama7b` on a GPU: LLaMA-7B's widths, bf16.

Length distributions (token counts per example, the image's placeholders included):
- ``scienceqa``: a synthetic stand-in for ScienceQA's question-context-options prompts under a LLaMA tokenizer
  (no ScienceQA copy is available offline here): half the examples carry an image (32 placeholder tokens, PILL's
  Q-Former queries); 45% have no context (45-90 text tokens), the rest a context whose length is log-normal
  (median 90 tokens, sigma 0.7) on top of 60; capped at --max-length; the answer ("The answer is X." and its end
  token) is the 8 supervised tokens. Lengths range ~45-500, several-fold apart, as the issue describes.
- ``demo``: `pill demo`'s examples: 4 image tokens and a fixed question, 58-66 tokens.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pill  # noqa: E402
from pill.data import IGNORE, Collator  # noqa: E402
from pill.packing import PackedCollator, real_tokens  # noqa: E402
from step_speed import SMOLLM2, STAGE, TINY  # noqa: E402  (the demo model's shape, each method's longest phase)

SIZES = {  # num_hidden_layers comes from --layers
    "smollm2": SMOLLM2,
    "llama7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                    vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=2048),
    "tiny": dict(TINY, max_position_embeddings=2048),
}
SUPERVISED = 8


def example_lengths(kind: str, count: int, max_length: int, seed: int) -> list[tuple[int, int]]:
    """(tokens, image placeholder tokens) per example."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        if kind == "demo":
            out.append((rng.randint(58, 66), 4))
            continue
        image = 32 if rng.random() < 0.5 else 0
        text = rng.randint(45, 90) if rng.random() < 0.45 else 60 + int(90 * math.exp(rng.gauss(0.0, 0.7)))
        out.append((min(text + image, max_length), image))
    return out


def encodings(lengths, image_token: int, vocab: int, placeholders: bool, seed: int):
    """(ids, labels) per example: placeholders first (methods that take them), random text, the last
    SUPERVISED tokens supervised."""
    gen = torch.Generator().manual_seed(seed)
    encoded = []
    for length, image in lengths:
        image = image if placeholders else 0
        ids = [1] + [image_token] * image + torch.randint(3, vocab, (length - 1 - image,), generator=gen).tolist()
        encoded.append((ids, [IGNORE] * (length - SUPERVISED) + ids[-SUPERVISED:]))
    return encoded


class _Example:
    def __init__(self, image_id, where):
        self.image_ids = [image_id] if image_id else []
        self.where = where


def run_one(args) -> dict:
    """One configuration in this process: {median_s, real/supervised tokens, padding share, peak memory}."""
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = dict(SIZES[args.size], num_hidden_layers=args.layers)
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(attn_implementation="sdpa", **size))
    spec = pill.methods.get_method(args.method)
    vision_dim = 64
    model = spec.inject(base, spec.config_class(**spec.demo_config), vision_dim=vision_dim,
                        image_token_id=size["vocab_size"] if spec.image_placeholders else None)
    pill.set_stage(model, STAGE[args.method])
    if device.type == "cuda":
        model.to(device)
        pill.set_compute_dtype(model, torch.bfloat16)
    batches = []
    features = {}
    for b in range(args.steps + 1):
        lengths = example_lengths(args.lengths, args.batch, args.max_length, seed=1000 * b)
        encoded = encodings(lengths, size["vocab_size"], size["vocab_size"], spec.image_placeholders, seed=b)
        examples = []
        for i, (length, image) in enumerate(lengths):
            key = f"{b}-{i}" if image else None
            if key:
                features[key] = torch.randn(32 if args.lengths == "scienceqa" else 4, vision_dim)
            examples.append(_Example(key, f"batch {b} example {i}"))
        batches.append((encoded, examples))

    def lookup(keys):
        return torch.stack([features[k] for k in keys])

    per_sequence = not spec.image_placeholders
    collate = (PackedCollator(0, lookup, per_sequence, max_length=args.max_length) if args.packed
               else Collator(0, lookup, per_sequence_images=per_sequence))
    collated = [{k: v.to(device) for k, v in collate(enc, ex).items()} for enc, ex in batches]
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)

    def step(batch):
        loss = model(**batch, logits_to_keep="supervised", use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(collated[0])  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for batch in collated[1:]:
        start = time.perf_counter()
        step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - before
    real = [real_tokens(b) for b in collated[1:]]
    computed = [b["input_ids"].numel() for b in collated[1:]]
    supervised = [int((b["labels"][:, 1:] != IGNORE).sum()) for b in collated[1:]]
    median = statistics.median(times)
    return {"method": args.method, "lengths": args.lengths, "threads": args.threads, "packed": args.packed,
            "median_s": median, "real_tokens": statistics.mean(real), "computed_tokens": statistics.mean(computed),
            "real_tokens_per_s": sum(real) / sum(times), "supervised_tokens_per_s": sum(supervised) / sum(times),
            "padding_share": 1 - sum(real) / sum(computed), "rows": [tuple(b["input_ids"].shape) for b in collated[1:]],
            "peak_step_memory_MiB": max(peak, 0) / 2 ** 20, "device": str(device)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--methods", nargs="+", default=["pill"], choices=list(STAGE))
    parser.add_argument("--lengths", nargs="+", default=["scienceqa"], choices=["scienceqa", "demo"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--size", default="smollm2", choices=list(SIZES))
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--packed", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", default="pill", help=argparse.SUPPRESS)
    parser.add_argument("--length-kind", dest="length_kind", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        args.threads, args.lengths = args.threads[0], args.length_kind
        print(json.dumps(run_one(args)))
        return {}
    rows = []
    for lengths in args.lengths:
        for method in args.methods:
            for threads in args.threads:
                for packed in (False, True):
                    command = [sys.executable, __file__, "--one", "--threads", str(threads), "--method", method,
                               "--length-kind", lengths, "--batch", str(args.batch), "--max-length",
                               str(args.max_length), "--layers", str(args.layers), "--size", args.size, "--steps",
                               str(args.steps)] + (["--packed"] if packed else [])
                    done = subprocess.run(command, capture_output=True, text=True)
                    if done.returncode:
                        raise RuntimeError(done.stderr[-3000:])
                    row = json.loads(done.stdout.strip().splitlines()[-1])
                    rows.append(row)
                    print(f"{lengths} {method} {threads} thread(s) {'packed' if packed else 'padded'}: "
                          f"{row['median_s']:.2f} s/step, {row['real_tokens_per_s']:.0f} real tok/s", file=sys.stderr,
                          flush=True)
    print("| lengths | method | threads | layout | rows x width (median) | padding | step s | real tok/s | "
          "supervised tok/s | peak step MiB | packed / padded |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        padded = next(r for r in rows if r["lengths"] == row["lengths"] and r["method"] == row["method"]
                      and r["threads"] == row["threads"] and not r["packed"])
        shape = sorted(row["rows"])[len(row["rows"]) // 2]
        ratio = row["real_tokens_per_s"] / padded["real_tokens_per_s"]
        print(f"| {row['lengths']} | {row['method']} | {row['threads']} | {'packed' if row['packed'] else 'padded'} "
              f"| {shape[0]} x {shape[1]} | {row['padding_share']:.0%} | {row['median_s']:.2f} | "
              f"{row['real_tokens_per_s']:.0f} | {row['supervised_tokens_per_s']:.1f} | "
              f"{row['peak_step_memory_MiB']:.0f} | {ratio:.2f}x |")
    result = {"rows": rows, "meta": {"torch": torch.__version__, "batch": args.batch, "max_length": args.max_length,
                                     "layers": args.layers, "size": args.size, "steps": args.steps}}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
