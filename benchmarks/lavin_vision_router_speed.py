"""LaVIN's training step with its vision routers (the CLIP tower inside the training graph) against the same step
on cached image features.

    python benchmarks/lavin_vision_router_speed.py [--threads N] [--batch 4] [--router-blocks 24] [--json out.json]

Tower: CLIP ViT-L/14's shape at 224 px (24 blocks, width 1024, 16 heads, 257 tokens), random weights written to a
temporary directory (the speed does not depend on the values; no download), read through `pill.vision.
HFVisionEncoder` with LaVIN's encoding (the CLS token after blocks 4, 8, ..., 24: 6 tokens x 1024). LLM:
SmolLM2-135M's shape (benchmarks/step_speed.py), batch x 64 tokens, the loss on the last 8, LaVIN stage 1 with
the demo's configuration. Rows:

- cached features: no vision routers, the tower ran once per image before training (`pill.vision.FeatureCache`);
- routers in graph: `LavinConfig.vision_router_blocks` routers, each step runs the frozen tower forward and
  backward (to the routers of its first blocks), as the seed trains them.

Medians of --repeats steps after one warm-up step.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pill  # noqa: E402
from pill.vision import HFVisionEncoder  # noqa: E402
from step_speed import SMOLLM2, TINY, build_base, inputs, median_seconds, method_step  # noqa: E402

CLIP_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                image_size=224, patch_size=14, projection_dim=768)
CLIP_TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
                 patch_size=14, projection_dim=16)


def write_random_tower(directory: Path, size: dict) -> None:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(**size)).save_pretrained(directory, safe_serialization=True)
    side = size["image_size"]
    CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(
        directory)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--router-blocks", type=int, default=None, help="default: every block of the tower")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="2-block tower, 2-layer LLM (a smoke test of this script)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tower, llm = (CLIP_TINY, TINY) if args.tiny else (CLIP_L14, SMOLLM2)
    blocks = tower["num_hidden_layers"]
    args.router_blocks = blocks if args.router_blocks is None else args.router_blocks
    if not 1 <= args.router_blocks <= blocks:
        raise SystemExit(f"--router-blocks must be in 1..{blocks}, got {args.router_blocks}")
    cls_layers = list(range(4, 25, 4)) if not args.tiny else [1, 2]
    spec = pill.methods.get_method("lavin")
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        write_random_tower(Path(directory), tower)
        encoder = HFVisionEncoder(directory, cls_layers=cls_layers)
        base = build_base(llm)
        ids, labels, _, image_token = inputs(base.config, args.batch, args.seq, len(cls_layers), 8,
                                             encoder.feature_dim, True)
        side = tower["image_size"]
        pixels = torch.rand(args.batch, 3, side, side, generator=torch.Generator().manual_seed(2)) * 2 - 1
        features = encoder(pixels)
        for name, router_blocks in (("cached features", 0), ("routers in graph", args.router_blocks)):
            config = spec.config_class(**{**spec.demo_config, "vision_router_blocks": router_blocks})
            model = pill.inject_lavin(build_base(llm), config, vision_dim=encoder.feature_dim,
                                      image_token_id=image_token, vision_encoder=encoder)
            pill.set_stage(model, 1)
            step = (method_step(model, ids, labels, None, {"images": pixels}) if router_blocks
                    else method_step(model, ids, labels, features, {}))
            seconds = median_seconds(step, args.repeats)
            print(f"{name}: {seconds:.3f} s", file=sys.stderr, flush=True)
            rows.append({"step": name, "router_blocks": router_blocks, "median_s": seconds,
                         "per_image_s": seconds / args.batch})
            del model
    meta = {"threads": torch.get_num_threads(), "torch": torch.__version__, "batch": args.batch, "seq": args.seq,
            "tower": "tiny" if args.tiny else "CLIP ViT-L/14 shape, 224 px", "cls_layers": cls_layers,
            "llm": "tiny" if args.tiny else "SmolLM2-135M shape", "repeats": args.repeats}
    print(f"LaVIN stage 1, batch {args.batch} x {args.seq}, {meta['threads']} thread(s), tower: {meta['tower']}\n")
    print("| step | vision routers | median (s) | per image (s) | / cached features |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['step']} | {row['router_blocks']} | {row['median_s']:.3f} | {row['per_image_s']:.3f} | "
              f"{row['median_s'] / rows[0]['median_s']:.1f}x |")
    result = {"meta": meta, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
