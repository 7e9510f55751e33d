"""`pill demo`'s 300 held-out multiple-choice questions as files a user's evaluation would have: each digit as a
PNG, the questions as conversation JSONL (with choices and answers), and a run config whose `data.eval` names
them, so that `pill eval` (either engine) and `benchmarks/vllm_server_load.py` (through `pill serve`) answer the
very questions the demo reports on. Run where `pill demo` runs (scikit-learn):

    python benchmarks/demo_eval_data.py --adapter DEMO_RUN/phase2/adapter --out /tmp/demo-eval
    pill eval /tmp/demo-eval/run.json --adapter DEMO_RUN/phase2/adapter [--engine vllm] --output preds.json

The config's `llm` is the base's checkpoint directory (the demo's GGUF converted once), so that an environment
without the GGUF's package (vLLM's) loads the same base. The PNGs hold the digits at 8 bits (the demo's images
are 17 grey levels in [0, 1]), so the features, and a few answers, can differ from the demo's in-memory run;
both engines read the same PNGs.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True, help="the demo's trained adapter (with its pill_run.json)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args(argv)
    from PIL import Image

    from pill.demo import DemoSettings, held_out_questions, split_digits
    from pill.llm import resolve_llm
    from pill.recipe import RUN_RECORD, llm_spec

    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    settings = DemoSettings()
    digits, test_idx, _ = split_digits(settings)
    questions = held_out_questions(digits, test_idx, settings)[0][:args.limit]
    record = json.loads((Path(args.adapter) / RUN_RECORD).read_text())
    base = resolve_llm(llm_spec({}, record["llm"])[0], record.get("cache_dir"))
    with open(out / "questions.jsonl", "w") as f:
        for i, ex in enumerate(questions):
            name = f"images/{i:03d}.png"
            Image.fromarray((np.asarray(ex.images[0]) * 255).round().astype(np.uint8)).save(out / name)
            f.write(json.dumps({"id": ex.where, "image": name, "messages": ex.messages, "choices": ex.choices,
                                "answer": ex.answer, "category": ex.category}) + "\n")
    config = {"llm": str(base), "vision": record["vision"], "prompt": record.get("prompt") or {},
              "data": {"eval": {"type": "conversations", "path": "questions.jsonl", "image_root": "."}},
              "eval": {"batch_size": settings.eval_batch_size, "max_new_tokens": 24},
              "cache_dir": str(out / "cache")}
    (out / "run.json").write_text(json.dumps(config, indent=2))
    print(f"{len(questions)} questions in {out / 'questions.jsonl'}; config {out / 'run.json'}")


if __name__ == "__main__":
    main()
