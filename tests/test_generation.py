"""generate() on the injected models against decoding loops that recompute the whole sequence with the plain
forward at every step (tests/generation_oracles.py): KV cache, left padding, per-step multimodal inputs."""
import pytest
import torch

import pill
from conftest import IMAGE_TOKEN, VISION_DIM, VOCAB, multimodal_batch
from generation_oracles import greedy_full_recompute, sampling_full_recompute
from test_models import METHODS, make_model

NEW_TOKENS = 8


def left_padded_batch(method, lengths=(9, 6, 11), images=(True, False, True)):
    """Rows of different lengths, left-padded with pad id 0: (input_ids, attention_mask, generate kwargs).
    PILL / LaVIN rows hold an image placeholder run where `images` says; LLaMA-Adapter V2 rows carry one
    image each, text-only rows flagged by sequence_modality."""
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    features = []
    for row, (length, has_image) in enumerate(zip(lengths, images)):
        row_ids, row_features = multimodal_batch(1, length, images=(has_image and method != "llama_adapter_v2",))
        ids[row, width - length:] = row_ids[0]
        mask[row, width - length:] = 1
        if row_features is not None:
            features.append(row_features)
    if method == "llama_adapter_v2":
        return ids, mask, {"image_features": torch.randn(len(lengths), 5, VISION_DIM, dtype=torch.float64),
                           "sequence_modality": torch.tensor(images)}
    return ids, mask, {"image_features": torch.cat(features)}


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_generate_equals_greedy_full_recompute(method, use_cache):
    model = make_model(method)
    ids, mask, inputs = left_padded_batch(method)
    expected = greedy_full_recompute(model, ids, mask, NEW_TOKENS, **inputs)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=use_cache,
                         eos_token_id=None, pad_token_id=0, **inputs)
    assert torch.equal(got, expected), f"generate:\n{got[:, ids.shape[1]:]}\ngreedy loop:\n{expected[:, ids.shape[1]:]}"
    # The oracle must see the images: without them the continuation differs (one row at least).
    if method != "llama_adapter_v2":
        text_only = ids.masked_fill(ids == IMAGE_TOKEN, 5)
        blind = greedy_full_recompute(model, text_only, mask, NEW_TOKENS)
        assert not torch.equal(blind[:, ids.shape[1]:], expected[:, ids.shape[1]:])


def prompts_ending_in_an_image(lengths=(9, 6, 11), images=(True, False, True), image_tokens=3):
    """Left-padded rows of different lengths (pad id 0), each flagged in `images` ending in an image placeholder
    run: (input_ids, attention_mask, image_features). The first generated token follows an image token there."""
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (length, has_image) in enumerate(zip(lengths, images)):
        ids[row, width - length:] = torch.randint(3, VOCAB, (length,))
        if has_image:
            ids[row, width - image_tokens:] = IMAGE_TOKEN
        mask[row, width - length:] = 1
    features = torch.randn(sum(images), image_tokens, VISION_DIM, dtype=torch.float64)
    return ids, mask, features


# Only PILL reads the type of each token (its modality gate and text / visual experts). LaVIN routes a whole sequence
# by its prompt's modality, fixed once per generate call, and LLaMA-Adapter V2 has no placeholders (its image enters
# through the prompts): neither reads the generated tokens' types, so neither could fail here.
@pytest.mark.parametrize("method", ["pill", "pill_query_head"])
def test_cached_generation_types_the_tokens_after_an_image_at_the_prompts_end_as_text(method):
    model = make_model(method)
    ids, mask, features = prompts_ending_in_an_image()
    # The oracle's forward reads the types off the placeholders: every generated token is text.
    expected = greedy_full_recompute(model, ids, mask, NEW_TOKENS, image_features=features)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True,
                         eos_token_id=None, pad_token_id=0, image_features=features)
    assert torch.equal(got, expected), f"generate:\n{got[:, ids.shape[1]:]}\ngreedy loop:\n{expected[:, ids.shape[1]:]}"
    # The prompts can tell: typing the generated tokens as the prompt's last token (an image in some rows) changes
    # what the model predicts after them.
    prompt_types = (ids == IMAGE_TOKEN).long()
    mistyped = torch.cat([prompt_types, prompt_types[:, -1:].expand(-1, NEW_TOKENS)], dim=1)
    full_mask = torch.cat([mask, torch.ones(ids.shape[0], NEW_TOKENS, dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        logits = model(input_ids=expected, attention_mask=full_mask, image_features=features,
                       mm_token_type_ids=mistyped).logits
    assert not torch.equal(logits[:, ids.shape[1]:-1].argmax(-1), expected[:, ids.shape[1] + 1:])


@pytest.mark.parametrize("method", ["pill", "lavin"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_a_generated_image_token_id_in_the_vocabulary_is_text(method, use_cache):
    """With the image token inside the vocabulary (a tokenizer's added <image>, as vLLM requires), the model may
    generate its id; that token is text, not a placeholder awaiting features. Oracle: full recompute from
    embeddings, generated tokens looked up in the embedding table and typed as text (so it does not depend on
    the image token's id); the id is then set to a token the oracle generates."""
    model = make_model(method)
    ids, mask, inputs = left_padded_batch(method)
    with torch.no_grad():
        prompt_embeds, prompt_types = model.multimodal.embed(model, ids, inputs["image_features"])
        extra = {"sequence_modality": prompt_types.any(dim=1)} if method == "lavin" else {}
        generated = ids.new_zeros(ids.shape[0], 0)
        for _ in range(NEW_TOKENS):
            logits = model(inputs_embeds=torch.cat([prompt_embeds, model.get_input_embeddings()(generated)], dim=1),
                           attention_mask=torch.cat([mask, torch.ones_like(generated)], dim=1),
                           mm_token_type_ids=torch.cat([prompt_types, torch.zeros_like(generated)], dim=1),
                           use_cache=False, **extra).logits
            generated = torch.cat([generated, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    in_vocabulary = [t for t in generated.flatten().tolist() if t not in set(ids.flatten().tolist())]
    assert in_vocabulary, "no generated token is absent from the prompts; pick other prompts"
    image_token = in_vocabulary[0]
    model.multimodal.image_token_id = image_token
    ids = ids.masked_fill(ids == IMAGE_TOKEN, image_token)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=use_cache,
                         eos_token_id=None, pad_token_id=0, **inputs)
    assert torch.equal(got[:, ids.shape[1]:], generated), f"generate:\n{got[:, ids.shape[1]:]}\nloop:\n{generated}"


@pytest.mark.parametrize("method", METHODS)
def test_sampling_equals_sampling_loop_with_several_sequences_per_prompt(method):
    model = make_model(method)
    ids, mask, inputs = left_padded_batch(method, lengths=(7, 10), images=(True, False))
    per_prompt = 2
    expanded = {k: v.repeat_interleave(per_prompt, dim=0) for k, v in inputs.items()}  # one image per image row
    if method != "llama_adapter_v2":
        expanded["image_features"] = inputs["image_features"].repeat_interleave(per_prompt, dim=0)
    torch.manual_seed(7)
    expected = sampling_full_recompute(model, ids.repeat_interleave(per_prompt, 0),
                                       mask.repeat_interleave(per_prompt, 0), NEW_TOKENS, 0.7, **expanded)
    torch.manual_seed(7)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=True, temperature=0.7,
                         top_k=0, top_p=1.0, num_return_sequences=per_prompt, eos_token_id=None, pad_token_id=0,
                         **inputs)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("method", ["pill", "pill_query_head"])
def test_generate_returns_the_placeholders_and_takes_logits_processors(method):
    """Placeholder ids lie outside the vocabulary; a repetition penalty indexes the scores with the input ids."""
    model = make_model(method)
    ids, mask, inputs = left_padded_batch(method)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, repetition_penalty=1.3,
                         eos_token_id=None, pad_token_id=0, **inputs)
    assert torch.equal(got[:, :ids.shape[1]], ids)


@pytest.mark.parametrize("method", METHODS)
def test_beam_search_is_refused(method):
    model = make_model(method)
    ids, mask, inputs = left_padded_batch(method)
    with pytest.raises(ValueError, match="beam search is not supported"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, num_beams=2, pad_token_id=0, **inputs)


def test_generate_refuses_inputs_embeds():
    model = make_model("pill")
    ids, mask, inputs = left_padded_batch("pill")
    with pytest.raises(ValueError, match="not inputs_embeds"):
        model.generate(ids, attention_mask=mask, inputs_embeds=torch.zeros(3, 11, 40, dtype=torch.float64),
                       **inputs)


@pytest.mark.parametrize("cache_name", ["past_key_values", "cache"])
def test_forward_takes_the_cache_under_either_name(cache_name):
    model = make_model("pill_query_head")
    ids, features = multimodal_batch(2, 9)
    new = torch.randint(3, 96, (2, 2))
    with torch.no_grad():
        full = model(input_ids=torch.cat([ids, new], 1), image_features=features).logits
        out = model(input_ids=ids, image_features=features, use_cache=True)
        step = model(input_ids=new, use_cache=True, **{cache_name: out.past_key_values}).logits
    torch.testing.assert_close(step, full[:, -2:], rtol=1e-9, atol=1e-9)


def test_pill_stage1_generation_matches_the_loop():
    """Stage 1 bypasses MAG and flips the last layer's routing: decoding follows the same switches."""
    model = make_model("pill")
    pill.set_stage(model, 1)
    ids, mask, inputs = left_padded_batch("pill")
    expected = greedy_full_recompute(model, ids, mask, NEW_TOKENS, **inputs)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                         pad_token_id=0, **inputs)
    assert torch.equal(got, expected)
