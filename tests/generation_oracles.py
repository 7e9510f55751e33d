"""Decoding oracles that share nothing with generate(): each step runs the model's plain forward on the whole
sequence so far (no KV cache, no prepare_inputs_for_generation), then picks the token itself."""
import torch


@torch.no_grad()
def greedy_full_recompute(model, input_ids, attention_mask, new_tokens, **forward_kwargs):
    """Prompt + `new_tokens` greedy tokens, recomputing the full (left-padded) sequence at every step."""
    ids, mask = input_ids, attention_mask
    for _ in range(new_tokens):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **forward_kwargs).logits
        next_token = logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_token], dim=1)
        mask = torch.cat([mask, torch.ones_like(next_token)], dim=1)
    return ids


@torch.no_grad()
def sampling_full_recompute(model, input_ids, attention_mask, new_tokens, temperature, **forward_kwargs):
    """Ancestral sampling at `temperature` (no top-k / top-p), one torch.multinomial draw per step over the
    whole batch: the draws generate makes from the same global generator state."""
    ids, mask = input_ids, attention_mask
    for _ in range(new_tokens):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **forward_kwargs).logits
        # generate scores in float32 whatever the model's dtype; the same rounding keeps the draws identical.
        probs = torch.softmax(logits[:, -1].float() / temperature, dim=-1)
        next_token = torch.multinomial(probs, num_samples=1)
        ids = torch.cat([ids, next_token], dim=1)
        mask = torch.cat([mask, torch.ones_like(next_token)], dim=1)
    return ids


def greedy_answers(model, formatter, examples, features, new_tokens):
    """What the evaluator should answer to each example's first user turn: the prompts batched as the trainer's
    collator pads them, `new_tokens` greedy tokens by full recompute, each answer cut at its first end token."""
    from pill.data import Collator

    tokenizer = formatter.tokenizer
    collator = Collator(tokenizer.pad_token_id, features,
                        per_sequence_images=model.multimodal.image_token_id is None)
    prompts = [formatter.encode_prompt(ex) for ex in examples]
    batch = collator([(p, p) for p in prompts], examples)
    batch.pop("labels")
    input_ids, attention_mask = batch.pop("input_ids"), batch.pop("attention_mask")
    out = greedy_full_recompute(model, input_ids, attention_mask, new_tokens, **batch)
    answers = []
    for row in out[:, input_ids.shape[1]:].tolist():
        if tokenizer.eos_token_id in row:
            row = row[:row.index(tokenizer.eos_token_id)]
        answers.append(tokenizer.decode(row, skip_special_tokens=True))
    return answers
