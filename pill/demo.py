"""`pill demo`: two-stage PILL training of a frozen SmolLM2-135M-Instruct on real images, offline, on a CPU.

Images: scikit-learn's 1797 handwritten digits (8x8, upscaled). Vision encoder: frozen pretrained
EfficientNet-Lite0 at 64x64 input, whose 2x2 feature map gives 4 image tokens of 1280 features (a logistic
probe on these features reaches ~93% held-out accuracy; 64 px instead of 224 px makes encoding every digit take
seconds instead of minutes, and the features are cached). Stage 1 teaches captions ("This handwritten digit is
seven."); stage 2 ScienceQA-style multiple choice with shuffled options ("Which digit is shown? Options: (A) ...
(D) ..." -> "The answer is C."). The held-out digits are never trained on. The base model (no adapters, so no
image) answers the same questions first, to show that the task cannot be solved from the text.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data import LETTERS, Example, PromptFormatter, answer_text
from .evaluate import evaluate_multiple_choice, format_report
from .llm import cache_dir, cast_base, load_llm
from .machine import ThreadWatch, choose_attention_dtype, choose_compute_dtype, dtype_name, pick_threads
from .model import set_compute_dtype
from .recipe import record_run
from .trainer import TrainConfig, Trainer
from .vision import EfficientNetLite0Encoder, FeatureCache

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CAPTION_PROMPT = "<image>\nWhat does the image show?"
QUESTION = "<image>\nWhich digit is shown? Options: {options}"


def options_after(choices) -> str:
    """Options with each letter after its word ("seven (A), two (B)"): what the answer names first can then be
    completed by copying the token that follows it in the prompt (what pretrained LMs' induction heads do)."""
    return ", ".join(f"{c} ({LETTERS[i]})" for i, c in enumerate(choices))


def mc_answer(word: str, index: int) -> str:
    """Chain of thought first (the digit and its option), then the ScienceQA answer sentence. A 135M model does not
    learn to bind an option's letter directly ("The answer is C.") within a CPU budget: measured, stage-2 loss
    stays at chance for 60 steps of 16, even with the digit spelled out in the prompt."""
    return f"This handwritten digit is {word} ({LETTERS[index]}). {answer_text(index)}"


@dataclass
class DemoSettings:
    """Sizes of the demo run. The defaults fit the 15-minute budget on 2 CPU cores with margin."""

    method: str = "pill"
    train_images: int = 1400
    test_images: int = 300
    stage1_steps: int = 50
    stage2_steps: int = 140
    batch_size: int = 16
    stage1_lr: float = 2e-3
    stage2_lr: float = 2e-3
    # Per phase, TrainConfig.lr_scale: {parameter-name part: learning-rate factor}.
    stage1_lr_scale: dict = field(default_factory=dict)
    stage2_lr_scale: dict = field(default_factory=dict)
    threads: int | None = None    # None: time 1 vs all cores before each phase and keep the faster
    image_size: int = 64
    grid: int = 2
    eval_batch_size: int = 64
    seed: int = 0
    base_eval: bool = True
    backend: str | None = None  # kernel backend of the fused ops; None: pill_kernels' default
    dtype: str = "auto"         # the frozen base's: auto | fastest | float32 | bfloat16 (pill.machine)
    # Off: the demo's examples differ by a few tokens, so a padded batch wastes little and packed rows (wider,
    # attention over more keys) are not faster (benchmarks/RESULTS.md, "Packing").
    packing: bool = False
    gradient_checkpointing: bool = False  # train.gradient_checkpointing: less activation memory, slower steps
    base_bits: int | None = None  # 4: the frozen LLM in 4-bit NF4 (pill.llm.load_llm)
    # "vllm": the held-out questions also answered through vLLM's engine (pill.serve), reported beside
    engine: str = "transformers"


def split_digits(settings: DemoSettings):
    """scikit-learn's digits and the seeded split: (digits, held-out indices, training indices)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = list(range(len(digits.target)))
    random.Random(settings.seed).shuffle(order)
    if settings.train_images + settings.test_images > len(order):
        raise ValueError(f"train_images + test_images must be at most {len(order)}")
    return (digits, order[:settings.test_images],
            order[settings.test_images:settings.test_images + settings.train_images])


def held_out_questions(digits, test_idx, settings: DemoSettings) -> tuple[list[Example], random.Random]:
    """The held-out multiple-choice questions, and the generator that goes on to draw the training examples
    (the option shuffles of both come from it, in this order)."""
    rng = random.Random(settings.seed + 1)
    return digit_examples(test_idx, digits.images, digits.target, rng, "mc"), rng


def digit_examples(indices, images, targets, rng: random.Random, kind: str) -> list[Example]:
    out = []
    for i in indices:
        label = int(targets[i])
        image = images[i] / 16.0
        where = f"sklearn digits #{i}"
        if kind == "caption":
            messages = [{"role": "user", "content": CAPTION_PROMPT},
                        {"role": "assistant", "content": f"This handwritten digit is {DIGIT_WORDS[label]}."}]
            out.append(Example(messages, [image], [f"sklearn-digits:{i}"], where=where))
            continue
        distractors = rng.sample([d for d in range(10) if d != label], 3)
        options = distractors + [label]
        rng.shuffle(options)
        choices = [DIGIT_WORDS[d] for d in options]
        answer = options.index(label)
        messages = [{"role": "user", "content": QUESTION.format(options=options_after(choices))},
                    {"role": "assistant", "content": mc_answer(DIGIT_WORDS[label], answer)}]
        out.append(Example(messages, [image], [f"sklearn-digits:{i}"], choices, answer,
                           {"digit": DIGIT_WORDS[label]}, where))
    return out


def inject(method: str, llm, vision_dim: int, backend: str | None = None):
    """The method with its demo configuration (`Method.demo_config`) on the demo's LLM."""
    from .methods import get_method

    spec = get_method(method, where="--method")
    config = spec.config_class(**spec.demo_config, backend=backend)
    # Outside the vocabulary, as the seed's <image_placeholder>.
    image_token_id = llm.config.vocab_size if spec.image_placeholders else None
    return spec.inject(llm, config, vision_dim=vision_dim, image_token_id=image_token_id)


def run_demo(settings: DemoSettings | None = None, *, llm: str | None = None, cache: str | None = None,
             output_dir: str | None = None, progress: bool = True, say=None) -> dict:
    """The whole demo (see the module docstring); returns its results, ``failures`` empty when it worked. The
    thread count it picks per phase is put back when it returns."""
    threads = torch.get_num_threads()
    try:
        return _run_demo(settings or DemoSettings(), llm=llm, cache=cache, output_dir=output_dir,
                         progress=progress, say=say)
    finally:
        torch.set_num_threads(threads)


def _run_demo(settings: DemoSettings, *, llm, cache, output_dir, progress, say) -> dict:
    if say is None:
        def say(*args):  # flushed: the demo is often watched through a pipe or a log file
            print(*args, flush=True)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    cache_root = cache_dir(cache)
    out_dir = Path(output_dir) if output_dir else cache_root / "demo-runs" / settings.method
    torch.manual_seed(settings.seed)

    def lap(name: str, since: float) -> float:
        timings[name] = time.perf_counter() - since
        return time.perf_counter()

    t = time.perf_counter()
    digits, test_idx, train_idx = split_digits(settings)
    say(f"[demo] method {settings.method}; {len(train_idx)} training digits, {len(test_idx)} held-out digits "
        f"(scikit-learn load_digits, upscaled to {settings.image_size}x{settings.image_size})")

    encoder = EfficientNetLite0Encoder(image_size=settings.image_size, grid=settings.grid)
    features_cache = FeatureCache(encoder, cache_root)
    used = sorted(set(train_idx) | set(test_idx))
    features_cache.features([f"sklearn-digits:{i}" for i in used], lambda k: digits.images[used[k]] / 16.0)
    lookup = lambda ids: features_cache.features(ids, _no_encode)  # noqa: E731
    t = lap("encode images (cached after the first run)", t)
    say(f"[demo] frozen EfficientNet-Lite0 features: {encoder.num_tokens} image tokens x {encoder.feature_dim} "
        f"per digit ({timings['encode images (cached after the first run)']:.1f} s)")

    model, tokenizer = load_llm(llm, cache=cache, bits=settings.base_bits)
    t = lap("load LLM", t)
    say(f"[demo] frozen LLM {model.config.num_hidden_layers} layers, hidden {model.config.hidden_size}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters"
        + (f", its projections in {settings.base_bits}-bit NF4" if settings.base_bits else "")
        + f" ({timings['load LLM']:.1f} s)")

    torch.set_num_threads(settings.threads or pick_threads())
    dtype, why = choose_compute_dtype(model, settings.dtype)
    say(f"[demo] frozen base in {dtype_name(dtype)}: {why}")
    cast_base(model, dtype)  # the base model's evaluation runs in it too
    test_mc, rng = held_out_questions(digits, test_idx, settings)
    results: dict = {"method": settings.method}
    if settings.base_eval:
        base_formatter = PromptFormatter(tokenizer, image_token_id=None, image_tokens=0, system="", max_length=256)
        # 16 new tokens hold any answer sentence the base model gives ("The answer is (B) two."); it does not
        # stop by itself.
        base = evaluate_multiple_choice(model, base_formatter, test_mc, None, batch_size=settings.eval_batch_size,
                                        max_new_tokens=16, progress=progress)
        t = lap("evaluate base model", t)
        results["base"] = _summary(base)
        say(format_report(base, "[demo] base model without adapters (sees no image; chance is 25%)"))
        say(f"[demo]   e.g. it answers {base['predictions'][0]['output']!r}")

    model = inject(settings.method, model, encoder.feature_dim, settings.backend)
    attention, why = choose_attention_dtype(model, dtype)
    say(f"[demo] {why}")
    set_compute_dtype(model, dtype, attention)  # the new adapters stay fp32
    mm = model.multimodal
    formatter = PromptFormatter(tokenizer, image_token_id=mm.image_token_id,
                                image_tokens=encoder.num_tokens if mm.image_token_id is not None else 0,
                                system="", max_length=256)
    stages = mm.config.stages
    phases = [("captions", 1, settings.stage1_steps, settings.stage1_lr, settings.stage1_lr_scale),
              ("multiple choice", stages[-1], settings.stage2_steps, settings.stage2_lr, settings.stage2_lr_scale)]
    for phase, (name, stage, steps, lr, lr_scale) in enumerate(phases, 1):
        if steps <= 0:
            continue
        kind = "caption" if phase == 1 else "mc"
        # Enough (image, option order) variants for every step to see fresh ones.
        repeats = -(-steps * settings.batch_size // len(train_idx))
        data = [ex for _ in range(repeats) for ex in digit_examples(train_idx, digits.images, digits.target, rng, kind)]
        config = TrainConfig(stage=stage, output_dir=str(out_dir / f"phase{phase}"), lr=lr, max_steps=steps,
                             batch_size=settings.batch_size, warmup_steps=max(1, steps // 10), seed=settings.seed,
                             progress=progress, dtype=dtype_name(dtype), packing=settings.packing,
                             lr_scale=dict(lr_scale), gradient_checkpointing=settings.gradient_checkpointing)
        _clear_run(Path(config.output_dir))
        threads = settings.threads or pick_threads(dtype=dtype)
        torch.set_num_threads(threads)
        watch = ThreadWatch(dtype=dtype)
        on_step = None if settings.threads else (lambda step, metrics: watch.step(say))
        trainer = Trainer(model, formatter, data, config, features=lookup, on_step=on_step)
        say(f"[demo] phase {phase}: {name}, method stage {stage}, {steps} steps of {settings.batch_size}, "
            f"{sum(p.numel() for p in trainer.params.values()):,} trainable parameters, {threads} thread(s)"
            + "".join(f"; lr x {factor:g} for '{part}'" for part, factor in lr_scale.items())
            + ("; gradient checkpointing" if any(getattr(layer, "gradient_checkpointing", False)
                                                 for layer in model.model.layers) else ""))
        metrics = trainer.train()
        t = lap(f"train phase {phase} ({name})", t)
        say(f"[demo]   loss {metrics['recent_loss']:.3f} over the last steps "
            f"({timings[f'train phase {phase} ({name})']:.0f} s)")
    torch.set_num_threads(settings.threads or pick_threads(dtype=dtype))
    result = evaluate_multiple_choice(model, formatter, test_mc, lookup, batch_size=settings.eval_batch_size,
                                      max_new_tokens=24, progress=progress)
    t = lap("evaluate", t)
    results["adapted"] = _summary(result)
    results["failures"] = demo_failures(results["adapted"], results.get("base"))
    # A few held-out items as asked and answered, to check the saved adapter against (tests, users).
    results["examples"] = [{"image": ex.image_ids[0], "question": ex.messages[0]["content"], "output": p["output"]}
                           for ex, p in zip(test_mc[:4], result["predictions"])]
    results["adapter"] = str(out_dir / "phase2" / "adapter")
    say(format_report(result, f"[demo] {settings.method} held-out multiple-choice accuracy"))
    say(f"[demo]   e.g. {test_mc[0].messages[0]['content'].splitlines()[-1]!r} -> {result['predictions'][0]['output']!r}"
        f" (right: {'ABCD'[test_mc[0].answer]})")
    run = {"llm": {"path": llm or "smollm2", "bits": settings.base_bits}, "cache_dir": cache,
           "prompt": {"format": "chat", "system": "", "max_length": 256},
           "vision": {"type": "efficientnet-lite0", "image_size": settings.image_size, "grid": settings.grid}}
    record_run(Path(results["adapter"]), run)
    if settings.engine == "vllm":
        results["vllm"] = _evaluate_through_vllm(results["adapter"], run, test_mc, lookup, result, say)
        t = lap("evaluate through vLLM", t)
        if results["vllm"]["same_outputs"] != len(test_mc):
            results["failures"].append(f"vLLM answered {len(test_mc) - results['vllm']['same_outputs']} held-out "
                                       f"questions otherwise than the transformers engine")
    results["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    results["total_s"] = round(time.perf_counter() - started, 1)
    say(f"[demo] adapter saved to {results['adapter']} (try: pill generate --adapter {results['adapter']} "
        f"--image DIGIT.png --question 'Which digit is shown? Options: one (A), two (B), three (C), four (D)')")
    say(f"[demo] total time {results['total_s']:.0f} s (" +
        ", ".join(f"{k} {v:.0f} s" for k, v in results["timings_s"].items()) + ")")
    for problem in results["failures"]:
        say(f"[demo] FAILED: {problem}")
    with open(out_dir / "demo_result.json", "w") as f:
        json.dump(results, f, indent=2)
    return results


def _evaluate_through_vllm(adapter: str, run: dict, questions, lookup, transformers_result: dict, say) -> dict:
    """The held-out questions through vLLM's engine (`pill eval --engine vllm`'s), with the same features, and
    how its outputs compare with the transformers engine's."""
    from .evaluate import score_multiple_choice
    from .recipe import inference_settings
    from .serve.engine import VllmAnswerer

    answerer = VllmAnswerer(adapter, inference_settings(adapter, {"llm": run["llm"]}), seed=0)
    started = time.perf_counter()
    result = score_multiple_choice(questions, answerer.generate_answers(questions, lookup, max_new_tokens=24))
    seconds = time.perf_counter() - started
    answerer.close()
    same = sum(a["output"] == b["output"] for a, b in zip(result["predictions"], transformers_result["predictions"]))
    same_parsed = sum(a["prediction"] == b["prediction"]
                      for a, b in zip(result["predictions"], transformers_result["predictions"]))
    say(format_report(result, "[demo] the same questions through vLLM's engine"))
    say(f"[demo]   outputs equal to the transformers engine's: {same}/{len(questions)}, parsed answers "
        f"{same_parsed}/{len(questions)} ({seconds:.1f} s)")
    return dict(_summary(result), same_outputs=same, same_parsed_answers=same_parsed, answer_s=round(seconds, 1))


def demo_failures(adapted: dict, base: dict | None, chance: float = 0.25) -> list[str]:
    """Why a demo run did not work, from its held-out summaries (empty when it did): most answers unparseable,
    or an accuracy not above the base model's (above chance when the base model was not evaluated)."""
    problems = []
    if adapted["unparseable_rate"] > 0.5:
        problems.append(f"{100 * adapted['unparseable_rate']:.0f}% of the held-out answers do not parse as an "
                        f"option (expected 'The answer is X.')")
    reference, what = (base["accuracy"], "the base model's") if base else (chance, "chance")
    if adapted["accuracy"] <= reference:
        problems.append(f"held-out accuracy {100 * adapted['accuracy']:.1f}% is not above {what} "
                        f"{100 * reference:.1f}%: the adapters did not learn the task")
    return problems


def _no_encode(index: int):
    raise RuntimeError("demo features must all be cached before training")


def _clear_run(path: Path) -> None:
    """The demo always trains from scratch: remove its own previous run directory (never anything else)."""
    import shutil

    if path.is_dir():
        shutil.rmtree(path)


def _summary(result: dict) -> dict:
    return {k: result[k] for k in ("accuracy", "correct", "total", "unparseable_rate", "accuracy_random_fallback",
                                   "categories")}
