"""Model level: the injected PILL / LaVIN / LLaMA-Adapter V2 layers on a small GQA LLaMA (docs/correctness.md,
"Model-level rules")."""
import copy

import pytest
import torch

import pill
from conftest import (IMAGE_TOKEN, VISION_DIM, assert_gradients_match, make_llama, multimodal_batch,
                      randomize_adapters)
from seed_reference import lavin_seed_logits, llama_adapter_v2_seed_logits, pill_seed_logits

METHODS = ["pill", "pill_query_head", "lavin", "llama_adapter_v2"]


def inject(method, model):
    if method == "pill":
        return pill.inject_pill(model, pill.PillConfig(adapter_dim=5), vision_dim=VISION_DIM,
                                image_token_id=IMAGE_TOKEN)
    if method == "pill_query_head":
        return pill.inject_pill(model, pill.PillConfig(adapter_dim=5, gate_per="query_head"), vision_dim=VISION_DIM,
                                image_token_id=IMAGE_TOKEN)
    if method == "lavin":
        return pill.inject_lavin(model, pill.LavinConfig(adapter_dim=6, groups=2, dropout=0.1, temperature=2.0),
                                 vision_dim=VISION_DIM, image_token_id=IMAGE_TOKEN)
    return pill.inject_llama_adapter_v2(model, pill.LlamaAdapterV2Config(prompt_len=4, visual_blocks=1,
                                                                         visual_heads=4), vision_dim=VISION_DIM)


def make_model(method, dtype=torch.float64, randomize=True, **kwargs):
    """The method injected, in its last stage (every part active: PILL's MAG, ...), adapters randomised."""
    model = inject(method, make_llama(dtype, **kwargs)).to(dtype)
    pill.set_stage(model, model.multimodal.config.stages[-1])
    if randomize:
        randomize_adapters(model)
    return model


def batch_for(method, batch=2, seq=11, images=(True, False)):
    """(input_ids, image_features, extra forward kwargs) in the method's image convention."""
    if method == "llama_adapter_v2":
        ids = torch.randint(3, 96, (batch, seq))
        features = torch.randn(batch, 5, VISION_DIM, dtype=torch.float64)
        return ids, features, {"sequence_modality": torch.tensor(list(images[:batch]))}
    ids, features = multimodal_batch(batch, seq, images=images)
    return ids, features, {}


def seed_logits(method, model, ids, features, attention_mask, extra, stage=2):
    if method.startswith("pill"):
        return pill_seed_logits(model, ids, features, attention_mask, stage=stage)
    if method == "lavin":
        return lavin_seed_logits(model, ids, features, attention_mask)
    features = features * extra["sequence_modality"].to(features.dtype)[:, None, None]
    visual_mask = extra["sequence_modality"]
    # The seed adds the visual query to every prompt; text-only rows get none here, as in pill.
    logits = llama_adapter_v2_seed_logits(model, ids, features, attention_mask)
    no_visual = llama_adapter_v2_seed_logits(model, ids, None, attention_mask)
    return torch.where(visual_mask[:, None, None], logits, no_visual)


def all_adapter_params_trainable(model):
    params = pill.adapter_parameters(model)
    for p in params.values():
        p.requires_grad_(True)
    return params


@pytest.mark.parametrize("method", METHODS)
def test_logits_and_gradients_match_seed_formulation(method):
    model = make_model(method)
    params = all_adapter_params_trainable(model)
    ids, features, extra = batch_for(method)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # right padding in the text-only row
    ours = model(input_ids=ids, attention_mask=mask, image_features=features, **extra).logits
    weights = torch.randn_like(ours)
    grads = torch.autograd.grad((ours * weights * mask[..., None]).sum(), list(params.values()), allow_unused=True)
    seed = seed_logits(method, model, ids, features, mask, extra)
    seed_grads = torch.autograd.grad((seed * weights * mask[..., None]).sum(), list(params.values()),
                                     allow_unused=True)
    valid = mask.bool()
    # LaVIN's seed puts text at positions 1..S; RoPE is relative, but transformers builds cos/sin in fp32.
    tol = 1e-6 if method == "lavin" else 1e-9
    torch.testing.assert_close(ours[valid], seed[valid], rtol=tol, atol=tol)
    assert_gradients_match(list(params), grads, seed_grads, tol)
    assert sum(g is not None and g.abs().max() > 0 for g in grads) >= len(params) // 2


@pytest.mark.parametrize("method", ["pill", "pill_query_head"])
def test_pill_stage1_matches_seed_formulation(method):
    model = make_model(method)
    pill.set_stage(model, 1)
    ids, features, extra = batch_for(method)
    ours = model(input_ids=ids, image_features=features).logits
    seed = pill_seed_logits(model, ids, features, None, stage=1)
    torch.testing.assert_close(ours, seed, rtol=1e-9, atol=1e-9)
    # Stage 1 bypasses MAG and flips the last layer's routing: the output differs from stage 2.
    pill.set_stage(model, 2)
    assert (model(input_ids=ids, image_features=features).logits - ours).abs().max() > 1e-6


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_init_text_only_gives_base_logits(method, dtype):
    base = make_llama(dtype)
    model = inject(method, copy.deepcopy(base)).to(dtype)
    ids = torch.randint(3, 96, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    expected = base(input_ids=ids, attention_mask=mask).logits
    got = model(input_ids=ids, attention_mask=mask).logits
    tol = 1e-5 if dtype == torch.float32 else 1e-6  # the base model normalises in fp32 even in fp64
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    assert (got - expected).abs().max() < tol


@pytest.mark.parametrize("method", METHODS)
def test_output_does_not_depend_on_the_rest_of_the_batch(method):
    model = make_model(method)
    images = (True, False, True)
    ids, features, extra = batch_for(method, batch=3, images=images)
    together = model(input_ids=ids, image_features=features, **extra).logits
    feature_row = 0
    for row in range(3):
        if method == "llama_adapter_v2":
            row_features = features[row:row + 1]
            row_extra = {"sequence_modality": extra["sequence_modality"][row:row + 1]}
        else:
            row_features = features[feature_row:feature_row + 1] if images[row] else None
            feature_row += int(images[row])
            row_extra = {}
        alone = model(input_ids=ids[row:row + 1], image_features=row_features, **row_extra).logits
        torch.testing.assert_close(together[row:row + 1], alone, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_does_not_change_real_tokens(method, side):
    model = make_model(method)
    ids, features, extra = batch_for(method, batch=1, seq=8, images=(True,))
    alone = model(input_ids=ids, image_features=features, **extra).logits[0]
    other_ids, other_features, other_extra = batch_for(method, batch=1, seq=12, images=(True,))
    pad = torch.zeros(1, 4, dtype=ids.dtype)
    padded = torch.cat([pad, ids], 1) if side == "left" else torch.cat([ids, pad], 1)
    mask = torch.cat([torch.zeros(1, 4), torch.ones(1, 8)], 1) if side == "left" else \
        torch.cat([torch.ones(1, 8), torch.zeros(1, 4)], 1)
    batch_ids = torch.cat([padded, other_ids])
    batch_mask = torch.cat([mask.long(), torch.ones(1, 12, dtype=torch.long)])
    if method == "llama_adapter_v2":
        batch_features = torch.cat([features, other_features])
        batch_extra = {"sequence_modality": torch.tensor([True, True])}
    else:
        batch_features, batch_extra = torch.cat([features, other_features]), {}
    logits = model(input_ids=batch_ids, attention_mask=batch_mask, image_features=batch_features,
                   **batch_extra).logits[0]
    real = logits[4:] if side == "left" else logits[:8]
    torch.testing.assert_close(real, alone, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("method", METHODS)
def test_kv_cache_decoding_equals_full_recompute(method):
    model = make_model(method)
    ids, features, extra = batch_for(method, batch=2, seq=9, images=(True, False))
    new_tokens = torch.randint(3, 96, (2, 3))
    full_ids = torch.cat([ids, new_tokens], 1)
    step_extra = dict(extra)
    if method == "lavin":
        step_extra["sequence_modality"] = (ids == IMAGE_TOKEN).any(-1)
    if method == "llama_adapter_v2":
        step_extra["visual_prompts"] = model.multimodal.visual_prompts(features, extra["sequence_modality"])
    with torch.no_grad():
        full = model(input_ids=full_ids, image_features=features, **extra).logits
        out = model(input_ids=ids, image_features=features, use_cache=True, **step_extra)
        cache, steps = out.past_key_values, [out.logits]
        for t in range(new_tokens.shape[1]):
            out = model(input_ids=new_tokens[:, t:t + 1], past_key_values=cache, use_cache=True,
                        mm_token_type_ids=torch.zeros(2, 1, dtype=torch.long), **step_extra)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("method", METHODS)
def test_gradient_checkpointing_recomputes_patched_layers_with_same_gradients(method):
    model = make_model(method)
    model.train()
    params = all_adapter_params_trainable(model)
    ids, features, extra = batch_for(method)
    calls = []
    for layer in model.model.layers:
        # Checkpointing re-runs the layer's forward without its __call__: count a submodule instead.
        layer.self_attn.q_proj.register_forward_pre_hook(lambda module, args: calls.append(module))

    def grads():
        torch.manual_seed(1234)  # the same dropout draw in both runs
        calls.clear()
        loss = model(input_ids=ids, image_features=features, labels=ids, **extra).loss
        return torch.autograd.grad(loss, list(params.values()), allow_unused=True), len(calls)

    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    plain, plain_calls = grads()
    enable()
    checkpointed, checkpointed_calls = grads()
    n_layers = len(model.model.layers)
    assert plain_calls == n_layers
    assert checkpointed_calls == 2 * n_layers, "checkpointing did not recompute the patched layers"
    for name, a, b in zip(params, plain, checkpointed):
        if a is None:
            assert b is None, name
        else:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")
    enable({"use_reentrant": True})
    with pytest.raises(ValueError, match="use_reentrant"):
        model(input_ids=ids, image_features=features, **extra)


def test_lavin_modality_token_routing_differs_by_modality_and_is_per_sequence():
    model = make_model("lavin")
    weights = model.multimodal.routing_weights(model, torch.tensor([True, False, True]))
    assert weights.shape == (3, 3, 2)
    torch.testing.assert_close(weights[0], weights[2])
    assert (weights[0] - weights[1]).abs().max() > 1e-4
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 3, dtype=weights.dtype))


def test_lavin_decoding_without_sequence_modality_raises():
    model = make_model("lavin")
    ids, features, _ = batch_for("lavin")
    out = model(input_ids=ids, image_features=features, use_cache=True)
    with pytest.raises(ValueError, match="sequence_modality"):
        model(input_ids=ids[:, :1], past_key_values=out.past_key_values, use_cache=True)


def test_image_features_change_the_output_once_trained():
    model = make_model("pill")
    ids, features, _ = batch_for("pill", batch=1, images=(True,))
    a = model(input_ids=ids, image_features=features).logits
    b = model(input_ids=ids, image_features=features + 1).logits
    assert (a - b).abs().max() > 1e-6


@pytest.mark.parametrize("method", METHODS)
def test_supervised_positions_loss_and_gradients_equal_the_full_logits_loss(method):
    """logits_to_keep="supervised" (the LM head on supervised positions only, wherever they are in a row: several
    answer spans, a right-padded row, the last column) against cross-entropy over the full logits, in float64."""
    model = make_model(method)
    ids, features, extra = batch_for(method, batch=2, seq=11)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding
    labels = torch.full_like(ids, -100)
    labels[0, [3, 4, 7, 10]] = ids[0, [3, 4, 7, 10]]
    labels[1, [1, 5, 6]] = ids[1, [1, 5, 6]]
    labels[labels == IMAGE_TOKEN] = -100
    params = [p for p in model.parameters() if p.requires_grad]

    full = model(input_ids=ids, attention_mask=mask, image_features=features, **extra).logits
    expected = torch.nn.functional.cross_entropy(full[:, :-1].reshape(-1, full.shape[-1]), labels[:, 1:].reshape(-1),
                                                 ignore_index=-100)
    expected_grads = torch.autograd.grad(expected, params)
    out = model(input_ids=ids, attention_mask=mask, image_features=features, labels=labels,
                logits_to_keep="supervised", **extra)
    supervised = int((labels[:, 1:] != -100).sum())
    assert out.logits.shape == (supervised, full.shape[-1]) and out.logits.is_contiguous()
    assert torch.equal(out.targets, labels[:, 1:][labels[:, 1:] != -100])
    torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(torch.autograd.grad(out.loss, params), expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    summed = model(input_ids=ids, attention_mask=mask, image_features=features, labels=labels,
                   logits_to_keep="supervised", num_items_in_batch=4, **extra).loss
    torch.testing.assert_close(summed, expected * supervised / 4, rtol=1e-12, atol=1e-12)


def test_supervised_positions_need_labels_and_no_cache():
    model = make_model("pill")
    ids, features, _ = batch_for("pill")
    with pytest.raises(ValueError, match="needs labels"):
        model(input_ids=ids, image_features=features, logits_to_keep="supervised")
    with pytest.raises(ValueError, match="use_cache=False"):
        model(input_ids=ids, image_features=features, labels=ids, logits_to_keep="supervised", use_cache=True)
    with pytest.raises(ValueError, match="'supervised'"):
        model(input_ids=ids, image_features=features, labels=ids, logits_to_keep="answers")


@pytest.mark.parametrize("std", [1.0, 0.02])
def test_v2_visual_query_std_sets_the_initial_scale_of_the_visual_queries(std):
    torch.manual_seed(0)
    config = pill.LlamaAdapterV2Config(prompt_len=8, visual_blocks=1, visual_heads=2, visual_query_std=std)
    model = pill.inject_llama_adapter_v2(make_llama(), config, vision_dim=64)
    queries = model.multimodal.projector.queries
    assert queries.shape == (8, 64)
    assert abs(float(queries.std()) / std - 1) < 0.15  # 512 draws of N(0, std^2)


@pytest.mark.parametrize("bad", [0, -0.1, "small", True])
def test_v2_visual_query_std_must_be_positive(bad):
    with pytest.raises(ValueError, match="visual_query_std must be a positive number"):
        pill.LlamaAdapterV2Config(visual_query_std=bad)
