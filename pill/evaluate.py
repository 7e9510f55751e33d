"""Generation and ScienceQA-style multiple-choice evaluation.

Decoding is greedy and stops at the end token, so results are deterministic. An answer is parsed with the
seed's pattern "The answer is X." (a parenthesised letter is accepted too); an answer that does not parse, or
names a letter outside the options, counts as wrong and is reported as unparseable (the seed code scores it as
a random option instead, which makes the metric noisy).
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Callable

import torch

from .data import LETTERS, Collator, Example, PromptFormatter

ANSWER_RE = re.compile(r"answer is:?\s*\(?([A-Z])\)?(?![A-Za-z])")


def parse_answer(text: str, choices) -> int | None:
    """The option `text` answers: "The answer is C." (or "(C)"), else "The answer is <an option's text>" naming
    exactly one option. `choices`: the options, or just their number (letters only)."""
    num = choices if isinstance(choices, int) else len(choices)
    match = ANSWER_RE.search(text)
    if match:
        index = LETTERS.index(match.group(1))
        return index if index < num else None
    if isinstance(choices, int):
        return None
    named = [i for i, c in enumerate(choices)
             if re.search(r"answer is:?\s*" + re.escape(c.strip()) + r"(?![\w])", text, flags=re.IGNORECASE)]
    return named[0] if len(named) == 1 else None


@torch.no_grad()
def generate_answers(model, formatter: PromptFormatter, examples: list[Example],
                     features: Callable[[list[str]], torch.Tensor] | None = None, *, batch_size: int = 32,
                     max_new_tokens: int = 32, progress: bool = False) -> list[str]:
    """Greedy answers (decoded text, special tokens removed) to the last user turn of each example."""
    tokenizer = formatter.tokenizer
    multimodal = hasattr(model, "multimodal")
    collator = Collator(tokenizer.pad_token_id, features,
                        per_sequence_images=multimodal and model.multimodal.image_token_id is None)
    device = model.get_input_embeddings().weight.device
    was_training = model.training
    model.eval()
    answers: list[str] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(examples), desc="generate", unit="ex", dynamic_ncols=True)
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            prompts = [formatter.encode_prompt(ex) for ex in chunk]
            batch = collator([(p, p) for p in prompts], chunk)
            batch.pop("labels")
            if not multimodal:
                if any(k in batch for k in ("image_features", "sequence_modality")):
                    raise ValueError("a model without adapters cannot take images; build its formatter with "
                                     "image_tokens=0 and leave features out")
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            new = out[:, batch["input_ids"].shape[1]:]
            answers += tokenizer.batch_decode(new, skip_special_tokens=True)
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    return answers


def evaluate_multiple_choice(model, formatter: PromptFormatter, examples: list[Example],
                             features: Callable[[list[str]], torch.Tensor] | None = None, *, batch_size: int = 32,
                             max_new_tokens: int = 32, progress: bool = False) -> dict:
    """Accuracy, unparseable rate, per-category accuracy (for each key of the examples' `category`) and the
    predictions."""
    check_multiple_choice(examples)
    texts = generate_answers(model, formatter, examples, features, batch_size=batch_size,
                             max_new_tokens=max_new_tokens, progress=progress)
    return score_multiple_choice(examples, texts)


def check_multiple_choice(examples: list[Example]) -> None:
    for ex in examples:
        if ex.choices is None:
            raise ValueError(f"{ex.where}: not a multiple-choice item (no choices / answer)")


def score_multiple_choice(examples: list[Example], texts: list[str]) -> dict:
    """`evaluate_multiple_choice`'s result for answers already generated (`texts`, one per example)."""
    check_multiple_choice(examples)
    correct = 0
    unparsed = 0
    by_category: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    predictions = []
    for ex, text in zip(examples, texts):
        guess = parse_answer(text, ex.choices)
        hit = guess is not None and guess == ex.answer
        correct += hit
        unparsed += guess is None
        for key, value in ex.category.items():
            cell = by_category[key][value]
            cell[0] += hit
            cell[1] += 1
        predictions.append({"where": ex.where, "output": text, "prediction": guess, "answer": ex.answer,
                            "correct": hit})
    n = len(examples)
    return {
        "accuracy": correct / n, "correct": correct, "total": n, "unparseable_rate": unparsed / n,
        # The seed scores an unparseable answer as a random option; this is that rule's expected accuracy.
        "accuracy_random_fallback": (correct + sum(1 / len(ex.choices) for ex, p in zip(examples, predictions)
                                                   if p["prediction"] is None)) / n,
        "categories": {key: {value: {"accuracy": c / t, "total": t} for value, (c, t) in sorted(values.items())}
                       for key, values in sorted(by_category.items())},
        "predictions": predictions,
    }


def format_report(result: dict, title: str = "accuracy") -> str:
    lines = [f"{title}: {100 * result['accuracy']:.1f}% ({result['correct']}/{result['total']}), "
             f"unparseable answers {100 * result['unparseable_rate']:.1f}%"]
    if result["unparseable_rate"]:
        lines[0] += (f" ({100 * result['accuracy_random_fallback']:.1f}% if those are scored as a random option, "
                     f"the seed's rule)")
    for key, values in result["categories"].items():
        cells = ", ".join(f"{v} {100 * s['accuracy']:.1f}% (n={s['total']})" for v, s in values.items())
        lines.append(f"  by {key}: {cells}")
    return "\n".join(lines)
