"""The three methods on Mistral, Qwen2 / Qwen2.5 and Qwen3 bases (`pill.families`), on tiny random GQA models of
each family with its features switched on: Qwen2's q/k/v biases (random, not transformers' zeros), Qwen3's per-head
q/k norms (random non-unit weights, a head_dim unlike hidden / heads). In float64, for PILL (per-KV-head and
per-query-head gates), LaVIN and LLaMA-Adapter V2: a text-only input at initialisation gives the base model's
logits; logits and every adapter gradient equal the independent re-implementation of each method on the block
the base's modules have (`tests/seed_reference.py`: per-head q/k norms written out, prompt keys through k_norm);
`generate` equals the greedy loop without a cache; a packed row gives each example what it gets alone; the cpp
and Triton backends equal eager. Then what each family is refused (sliding windows, other families),
LLaMA-Adapter V2's bias and norm tuning per family, adapter files, loading a checkpoint directory and seed
conversion. The same on LLaMA is in test_models.py, test_generation.py and test_packing.py."""
import copy
import importlib.util

import pytest
import torch
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

import pill
import pill_kernels as pk
from pill.families import FAMILIES, UnsupportedBaseError
from conftest import IMAGE_TOKEN, VISION_DIM, VOCAB, assert_gradients_match, randomize_adapters
from generation_oracles import greedy_full_recompute
from test_generation import NEW_TOKENS, left_padded_batch
from test_models import METHODS, all_adapter_params_trainable, batch_for, inject, seed_logits

FAMILY_NAMES = ["mistral", "qwen2", "qwen3"]
CLASSES = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
           "qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}


# Sliding windows shorter than the test sequences (9 to 19 tokens): Mistral's on every layer; Qwen2's on the
# layers after max_window_layers (layer 0 full, layer 1 sliding: the model builds a mask per layer type);
# Qwen3's on every layer.
WINDOWS = {"mistral": dict(sliding_window=4),
           "qwen2": dict(use_sliding_window=True, sliding_window=5, max_window_layers=1),
           "qwen3": dict(use_sliding_window=True, sliding_window=3, max_window_layers=0)}
NO_WINDOW = {"mistral": dict(sliding_window=None),  # as Mistral v0.2 / v0.3
             "qwen2": dict(use_sliding_window=False), "qwen3": dict(use_sliding_window=False)}


def family_config(family, layers=2, windows=True, **overrides):
    """A tiny GQA config (4 query / 2 key-value heads, hidden 40) of `family` with its features on: sliding
    windows (`WINDOWS`) unless `windows` is false."""
    settings = dict(vocab_size=VOCAB, hidden_size=40, intermediate_size=56, num_hidden_layers=layers,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
                    bos_token_id=1, eos_token_id=2)
    settings.update((WINDOWS if windows else NO_WINDOW).get(family, {}))
    if family == "qwen3":
        settings["head_dim"] = 12  # not hidden / heads = 10: Qwen3's head_dim is a field of its own
    config = CLASSES[family][0](**{**settings, **overrides})
    config._attn_implementation = "sdpa"
    return config


def make_base(family, dtype=torch.float64, **overrides):
    """The family's model with random biases wherever the family has them and random per-head norm weights
    (transformers initialises both to zeros / ones, which would hide a missing bias or norm)."""
    model = CLASSES[family][1](family_config(family, **overrides)).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.model.layers.named_parameters():
            if name.endswith(".bias"):
                p.copy_(0.3 * torch.randn_like(p))
            elif "q_norm" in name or "k_norm" in name:
                p.copy_(1.0 + 0.5 * torch.randn_like(p))
    return model


def make_model(method, family, dtype=torch.float64, **overrides):
    """The method injected into the family's base, in its last stage, adapters randomised."""
    model = inject(method, make_base(family, dtype, **overrides)).to(dtype)
    pill.set_stage(model, model.multimodal.config.stages[-1])
    return randomize_adapters(model)


def test_the_bases_have_the_features_under_test():
    """The test models exercise each family's difference (else the tests below could not fail on it), and the
    family table says what transformers builds."""
    for family in FAMILY_NAMES + ["llama"]:
        base = make_base(family)
        attn = base.model.layers[0].self_attn
        record = FAMILIES[family]
        assert (attn.q_proj.bias is not None) == record.qkv_bias(base.config), family
        assert hasattr(attn, "q_norm") == record.qk_norm, family
        assert base.config.hidden_act == "silu"
    assert make_base("qwen2").model.layers[0].self_attn.k_proj.bias.abs().min() > 0
    qwen3 = make_base("qwen3").model.layers[0].self_attn
    assert qwen3.head_dim == 12 and (qwen3.k_norm.weight - 1).abs().max() > 0.1
    assert FAMILIES["llama"].qkv_bias(family_config("llama", attention_bias=True))
    assert FAMILIES["qwen3"].qkv_bias(family_config("qwen3", attention_bias=True))
    expected_windows = {"mistral": [4, 4], "qwen2": [None, 5], "qwen3": [3, 3], "llama": [None, None]}
    for family, windows in expected_windows.items():
        assert FAMILIES[family].layer_windows(family_config(family)) == windows, family
        assert FAMILIES[family].layer_windows(family_config(family, windows=False)) == [None, None], family


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_the_windows_change_the_base_models_output(family):
    """The window under test is shorter than the sequences: without it the base gives other logits after it
    (so a method layer that ignored the window could not match the oracles)."""
    windowed = make_base(family)
    full = CLASSES[family][1](family_config(family, windows=False)).to(torch.float64).eval()
    full.load_state_dict(windowed.state_dict())
    ids = torch.randint(3, VOCAB, (1, 11))
    a, b = windowed(input_ids=ids).logits, full(input_ids=ids).logits
    window = min(w for w in FAMILIES[family].layer_windows(windowed.config) if w is not None)
    torch.testing.assert_close(a[:, :window], b[:, :window], rtol=1e-12, atol=1e-12)
    assert (a[:, window:] - b[:, window:]).abs().amax() > 1e-3


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("method", METHODS)
def test_zero_init_text_only_gives_base_logits(method, family):
    base = make_base(family)
    model = inject(method, copy.deepcopy(base)).to(torch.float64)
    assert type(model).__name__ == f"Multimodal{type(base).__name__}"
    assert isinstance(model, type(base)) and isinstance(model.model.layers[0], type(base.model.layers[0]))
    ids = torch.randint(3, VOCAB, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    expected = base(input_ids=ids, attention_mask=mask).logits
    got = model(input_ids=ids, attention_mask=mask).logits
    # The adapters normalise in fp64, the base's RMSNorm rounds through fp32.
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", FAMILY_NAMES + ["llama_biased"])
@pytest.mark.parametrize("method", METHODS)
def test_logits_loss_and_gradients_match_the_independent_formulation(method, family):
    """llama_biased: a LLaMA with attention and MLP biases, where LLaMA-Adapter V2's tuned biases all sit beside
    pretrained ones."""
    if family == "llama_biased":
        model = inject(method, make_base("llama", attention_bias=True, mlp_bias=True)).to(torch.float64)
        pill.set_stage(model, model.multimodal.config.stages[-1])
        randomize_adapters(model)
    else:
        model = make_model(method, family)
    params = all_adapter_params_trainable(model)
    ids, features, extra = batch_for(method)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # right padding in the text-only row
    labels = ids.masked_fill(mask == 0, -100)
    logits = model(input_ids=ids, attention_mask=mask, image_features=features, **extra).logits
    # The trainer's loss (transformers' own rounds fp64 logits to fp32).
    loss = model(input_ids=ids, attention_mask=mask, image_features=features, labels=labels,
                 logits_to_keep="supervised", **extra).loss
    seed = seed_logits(method, model, ids, features, mask, extra)
    targets = labels[:, 1:].masked_fill(labels[:, 1:] == IMAGE_TOKEN, -100)
    seed_loss = torch.nn.functional.cross_entropy(seed[:, :-1].reshape(-1, seed.shape[-1]), targets.reshape(-1))
    valid = mask.bool()
    # LaVIN's seed puts text at positions 1..S; RoPE is relative, but transformers builds cos/sin in fp32.
    tol = 1e-6 if method == "lavin" else 1e-9
    torch.testing.assert_close(logits[valid], seed[valid], rtol=tol, atol=tol)
    torch.testing.assert_close(loss, seed_loss, rtol=tol, atol=tol)
    weights = torch.randn_like(logits)
    # One objective per graph: the base's RMSNorms run their backward in fp32 too, so gradients summed before or
    # after them round differently.
    for what, ours, theirs in (("logits", (logits * weights * mask[..., None]).sum(),
                                (seed * weights * mask[..., None]).sum()), ("loss", loss, seed_loss)):
        grads = torch.autograd.grad(ours, list(params.values()), allow_unused=True, retain_graph=True)
        seed_grads = torch.autograd.grad(theirs, list(params.values()), allow_unused=True, retain_graph=True)
        assert_gradients_match(list(params), grads, seed_grads, tol, what=f"{what}, ")
    assert sum(g is not None and g.abs().max() > 0 for g in grads) >= len(params) // 2


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("method", METHODS)
def test_generate_equals_greedy_loop_without_cache(method, family):
    model = make_model(method, family)
    ids, mask, inputs = left_padded_batch(method)
    expected = greedy_full_recompute(model, ids, mask, NEW_TOKENS, **inputs)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True,
                         eos_token_id=None, pad_token_id=0, **inputs)
    assert torch.equal(got, expected), f"generate:\n{got[:, ids.shape[1]:]}\ngreedy loop:\n{expected[:, ids.shape[1]:]}"


def packed_and_alone(method, lengths=(7, 5), images=(True, False)):
    """One row holding an example per length (the first with an image) and a token of end padding, and the
    examples alone: (packed kwargs, [alone kwargs])."""
    alone, row, features, sequence_ids = [], [], [], []
    v2 = method == "llama_adapter_v2"
    for number, (length, has_image) in enumerate(zip(lengths, images)):
        ids, example_features, extra = batch_for(method, batch=1, seq=length, images=(has_image,))
        if v2:
            alone.append({"input_ids": ids, "image_features": example_features, **extra})
        else:
            alone.append({"input_ids": ids, "image_features": example_features})
        row.append(ids[0])
        sequence_ids += [number] * length
        if example_features is not None:
            features.append(example_features)
    packed = {"input_ids": torch.cat(row + [torch.zeros(1, dtype=torch.long)])[None],
              "sequence_ids": torch.tensor([sequence_ids + [-1]]), "image_features": torch.cat(features)}
    if v2:
        packed["sequence_modality"] = torch.tensor(images)
    return packed, alone


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("method", METHODS)
def test_a_packed_row_gives_each_example_what_it_gets_alone(method, family):
    model = make_model(method, family)
    params = {n: p for n, p in pill.adapter_parameters(model).items() if p.requires_grad}
    packed, alone = packed_and_alone(method)
    logits = model(**packed).logits[0]
    weights = torch.randn_like(logits)
    real = packed["sequence_ids"][0] >= 0
    grads = torch.autograd.grad((logits * weights)[real].sum(), list(params.values()), allow_unused=True)
    expected_grads = [torch.zeros_like(p) for p in params.values()]
    sequence_ids = packed["sequence_ids"][0]
    for number, inputs in enumerate(alone):
        own = sequence_ids == number
        alone_logits = model(**inputs).logits[0]
        torch.testing.assert_close(logits[own], alone_logits, rtol=1e-10, atol=1e-10,
                                   msg=lambda m: f"example {number}: {m}")
        for total, g in zip(expected_grads, torch.autograd.grad((alone_logits * weights[own]).sum(),
                                                                list(params.values()), allow_unused=True)):
            if g is not None:
                total += g
    for name, g, expected in zip(params, grads, expected_grads):
        torch.testing.assert_close(g if g is not None else torch.zeros_like(expected), expected, rtol=1e-9,
                                   atol=1e-10, msg=lambda m: f"{name}: {m}")


BACKEND_CASES = [(method, family, "triton") for method in METHODS for family in FAMILY_NAMES] + [
    # cpp has the adapters and the modality gate, not the gated attention (which the others call).
    (method, family, "cpp") for method in ("pill", "lavin") for family in FAMILY_NAMES]


@pytest.mark.parametrize("method,family,backend", BACKEND_CASES)
def test_fused_backends_equal_eager(method, family, backend, resolved_backends):
    ops = ("gated_attention",) if method in ("pill_query_head", "llama_adapter_v2") else ()
    ops += ("routed_glu_adapter",) if method.startswith("pill") else ("soft_routed_adapter",) if method == "lavin" \
        else ()
    for op in ops:
        if backend not in pk.available_backends(op, "cpu"):
            pytest.skip(f"backend {backend!r} cannot run {op} here")
    model = make_model(method, family)
    params = all_adapter_params_trainable(model)
    ids, features, extra = batch_for(method, seq=9)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding

    def run(name):
        pill.set_kernel_backend(model, name)
        logits = model(input_ids=ids, attention_mask=mask, image_features=features, **extra).logits
        grads = torch.autograd.grad((logits * mask[..., None]).square().sum(), list(params.values()),
                                    allow_unused=True)
        return logits.detach(), grads

    (logits_b, grads_b), (logits_e, grads_e) = run(backend), run("eager")
    assert {op for op, chosen in resolved_backends if chosen == backend} >= set(ops)
    torch.testing.assert_close(logits_b, logits_e, rtol=1e-9, atol=1e-9)
    for name, gb, ge in zip(params, grads_b, grads_e):
        if ge is None:
            assert gb is None, name
            continue
        torch.testing.assert_close(gb, ge, rtol=1e-8, atol=1e-9, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_hidden_states_are_still_captured(family):
    """The layers stay instances of their family's decoder layer, which transformers' output capture hooks."""
    model = make_model("pill", family)
    ids, features, _ = batch_for("pill")
    out = model(input_ids=ids, image_features=features, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_gradient_checkpointing_recomputes_the_family_layers(family):
    model = make_model("llama_adapter_v2", family)
    model.train()
    params = all_adapter_params_trainable(model)
    ids, features, extra = batch_for("llama_adapter_v2")
    calls = []
    for layer in model.model.layers:
        layer.self_attn.k_proj.register_forward_pre_hook(lambda module, args: calls.append(module))

    def grads():
        calls.clear()
        loss = model(input_ids=ids, image_features=features, labels=ids, logits_to_keep="supervised", **extra).loss
        return torch.autograd.grad(loss, list(params.values()), allow_unused=True), len(calls)

    plain, plain_calls = grads()
    pill.enable_gradient_checkpointing(model)
    checkpointed, checkpointed_calls = grads()
    # Each layer's keys, then each prompted layer's prompt keys; all of it again in the backward.
    assert checkpointed_calls == 2 * plain_calls > 0
    for name, a, b in zip(params, plain, checkpointed):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                    reason="the 4-bit base needs bitsandbytes: pip install 'pill-kernels[lowmem]'")
@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("method", ["pill", "llama_adapter_v2"])
def test_a_4bit_base_equals_its_dequantized_weights(method, family, tmp_path):
    """As test_quantized_base.py on LLaMA: the oracle is the method over a float64 twin whose projections are
    bitsandbytes' dequantization of the 4-bit ones (biases, Qwen3's norms and LLaMA-Adapter V2's tuned biases
    beside Qwen2's stay full precision)."""
    from bitsandbytes.functional import dequantize_4bit

    from pill.llm import load_llm
    from trainer_testing import char_tokenizer

    # Widths are multiples of 32 for bitsandbytes' CPU kernels; Qwen3's heads are wider than hidden / heads.
    widths = dict(hidden_size=64, intermediate_size=128, **({"head_dim": 32} if family == "qwen3" else {}))
    make_base(family, dtype=torch.float32, **widths).save_pretrained(tmp_path, safe_serialization=True)
    char_tokenizer().save_pretrained(tmp_path)
    quantized = inject(method, load_llm(tmp_path, bits=4)[0].eval())
    twin = CLASSES[family][1].from_pretrained(tmp_path, dtype=torch.float64).eval()
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if not getattr(module, "weight", torch.empty(0)).is_floating_point():
                weight = dequantize_4bit(module.weight.data, module.weight.quant_state)
                twin.get_submodule(name).weight.copy_(weight.to(torch.float64))
    twin = inject(method, twin).to(torch.float64)
    pill.set_stage(quantized, quantized.multimodal.config.stages[-1])
    pill.set_stage(twin, twin.multimodal.config.stages[-1])
    randomize_adapters(quantized)
    with torch.no_grad():
        for name, p in pill.adapter_parameters(twin).items():
            p.copy_(pill.adapter_parameters(quantized)[name].to(torch.float64))
    ids, features, extra = batch_for(method)
    results = []
    for model, dtype in ((quantized, torch.float32), (twin, torch.float64)):
        params = pill.adapter_parameters(model)
        out = model(input_ids=ids, image_features=features.to(dtype), labels=ids, logits_to_keep="supervised",
                    **extra)
        grads = torch.autograd.grad(out.loss, [p for p in params.values() if p.requires_grad])
        results.append((out.logits.double(), out.loss.double(), [g.double() for g in grads]))
    (logits, loss, grads), (want_logits, want_loss, want_grads) = results
    torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    for g, want in zip(grads, want_grads):
        scale = want.abs().max().clamp_min(1e-6)
        torch.testing.assert_close(g / scale, want / scale, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# Refusals
# ----------------------------------------------------------------------------------------------------------

def test_transformers_defaults_and_odd_layer_types():
    # transformers' MistralConfig defaults to v0.1's 4096-token window, which is now run as such.
    default = MistralConfig(vocab_size=VOCAB, hidden_size=40, intermediate_size=56, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2)
    model = pill.inject_pill(MistralForCausalLM(default), vision_dim=8, image_token_id=VOCAB)
    assert model.model.layers[0].attention_window == 4096
    # Qwen2 / Qwen3 keep sliding_window and max_window_layers inert while use_sliding_window is false.
    for family in ("qwen2", "qwen3"):
        config = family_config(family, windows=False, sliding_window=4, max_window_layers=0)
        model = pill.inject_lavin(CLASSES[family][1](config), vision_dim=8, image_token_id=VOCAB)
        assert [layer.attention_window for layer in model.model.layers] == [None, None]
    # A sliding layer without a window, on which transformers' mask builder would fail.
    config = family_config("qwen2", windows=False, layer_types=["full_attention", "sliding_attention"])
    with pytest.raises(UnsupportedBaseError, match=r"layer_types holds \['sliding_attention'\] \(with "
                                                    r"config.sliding_window=None\)"):
        pill.inject_pill(Qwen2ForCausalLM(config), vision_dim=8, image_token_id=VOCAB)


def test_other_families_and_subclasses_are_refused_by_name():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(TypeError, match=r"expected a transformers LlamaForCausalLM \(LLaMA\), MistralForCausalLM "
                                        r"\(Mistral\), Qwen2ForCausalLM \(Qwen2 / Qwen2.5\), Qwen3ForCausalLM "
                                        r"\(Qwen3\), got GPT2LMHeadModel \(model_type 'gpt2'\)"):
        pill.inject_pill(gpt2, vision_dim=8, image_token_id=60)

    class Patched(Qwen2ForCausalLM):  # may change the forward the method layers re-implement
        pass

    with pytest.raises(UnsupportedBaseError, match="got Patched"):
        pill.inject_lavin(Patched(family_config("qwen2")), vision_dim=8, image_token_id=60)
    model = make_model("pill", "qwen3")
    with pytest.raises(ValueError, match="already has the 'pill' adapters injected"):
        pill.inject_llama_adapter_v2(model, vision_dim=8)


# ----------------------------------------------------------------------------------------------------------
# LLaMA-Adapter V2's bias and norm tuning per family
# ----------------------------------------------------------------------------------------------------------

def v2_stage_names(family, **overrides):
    model = pill.inject_llama_adapter_v2(make_base(family, **overrides), pill.LlamaAdapterV2Config(
        prompt_len=2, visual_blocks=0, visual_heads=4), vision_dim=VISION_DIM)
    return model, set(pill.stage_parameters(model, 2))


def test_v2_tuning_on_llama_is_the_seeds_set():
    _, names = v2_stage_names("llama")
    per_layer = ["self_attn.q_proj.bias", "self_attn.o_proj.bias", "mlp.gate_proj.bias", "mlp.up_proj.bias",
                 "mlp.down_proj.bias", "input_layernorm.weight", "post_attention_layernorm.weight"]
    assert names == {f"model.layers.{i}.{n}" for i in range(2) for n in per_layer} | {"model.norm.weight"}


def test_v2_bias_tuning_keeps_qwen2s_pretrained_biases_frozen_and_adds_zero_init_ones():
    base = make_base("qwen2")
    pretrained = {n: p.detach().clone() for n, p in base.named_parameters() if n.endswith(".bias")}
    model, names = v2_stage_names("qwen2")
    model.load_state_dict({**model.state_dict(), **pretrained})
    assert not any(n in names for n in pretrained)  # q/k/v biases: the base's, frozen
    for i in range(2):
        assert f"model.layers.{i}.pill_bias.q_proj" in names  # q: a new bias beside the pretrained one
        assert f"model.layers.{i}.self_attn.o_proj.bias" in names  # o: none pretrained, the projection's own
        assert f"model.layers.{i}.self_attn.k_proj.bias" not in names
    for name in names:
        if "bias" in name:
            assert pill.stage_parameters(model, 2)[name].abs().max() == 0, name
    assert all(".pill_bias." not in n for n in pill.stage_parameters(model, 1))


def test_v2_norm_tuning_leaves_qwen3s_query_and_key_norms_frozen():
    model, names = v2_stage_names("qwen3")
    assert not any("q_norm" in n or "k_norm" in n for n in names)
    assert {f"model.layers.{i}.{n}" for i in range(2) for n in ("input_layernorm.weight",
                                                                "post_attention_layernorm.weight")} <= names
    assert "model.norm.weight" in names
    pill.set_stage(model, 2)
    assert not model.model.layers[0].self_attn.q_norm.weight.requires_grad


# ----------------------------------------------------------------------------------------------------------
# Adapter files, loading, conversion
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_an_adapter_reloads_on_its_family_and_is_refused_on_another(family, tmp_path):
    model = make_model("llama_adapter_v2", family)
    ids, features, extra = batch_for("llama_adapter_v2")
    expected = model(input_ids=ids, image_features=features, **extra).logits
    pill.save_adapter(model, tmp_path / "adapter")
    base = make_base(family)
    base.load_state_dict({k: v for k, v in model.state_dict().items() if k in base.state_dict()}, strict=False)
    loaded = pill.load_pretrained_adapter(base.to(torch.float64), tmp_path / "adapter")
    loaded.to(torch.float64)
    torch.testing.assert_close(loaded(input_ids=ids, image_features=features, **extra).logits, expected)
    other = "llama" if family != "llama" else "qwen2"
    with pytest.raises(ValueError, match=f"base_model.model_type: checkpoint has '{family}', model has '{other}'"):
        pill.load_pretrained_adapter(make_base(other), tmp_path / "adapter")


def test_load_llm_keeps_each_familys_class_and_biases(tmp_path):
    from pill.llm import load_llm
    from trainer_testing import char_tokenizer

    for family in FAMILY_NAMES:
        base = make_base(family, dtype=torch.float32)
        directory = tmp_path / family
        base.save_pretrained(directory, safe_serialization=True)
        char_tokenizer().save_pretrained(directory)
        model, _ = load_llm(directory)
        assert type(model) is type(base)
        assert FAMILIES[family].layer_windows(model.config) == FAMILIES[family].layer_windows(base.config)
        for (name, p), (_, q) in zip(base.named_parameters(), model.named_parameters()):
            assert torch.equal(p, q), f"{family}: {name}"
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2)).save_pretrained(gpt2)
    with pytest.raises(UnsupportedBaseError, match=r"model_type 'gpt2' is not supported"):
        load_llm(gpt2)


GGUF_TENSORS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
                "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                "model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def write_gguf(model, path):
    """`model` as llama.cpp writes a Qwen2 / Qwen3 file (fp32 tensors under its names; a byte-level vocabulary)."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    config = model.config
    writer = gguf.GGUFWriter(str(path), config.model_type)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    tokens = list(bytes_to_unicode().values())[:config.vocab_size - 1] + ["<|endoftext|>"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - 1) + [3])
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_merges([])
    writer.add_eos_token_id(len(tokens) - 1)
    for name, tensor in model.state_dict().items():
        module, kind = name.rsplit(".", 1)
        if module.startswith("model.layers."):
            index, module = module.removeprefix("model.layers.").split(".", 1)
            writer.add_tensor(f"blk.{index}.{GGUF_TENSORS[module]}.{kind}", tensor.float().numpy())
        else:
            writer.add_tensor(f"{GGUF_TENSORS[module]}.{kind}", tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_gguf_file_loads_as_its_familys_class(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")  # transformers' GGUF loading needs it in some releases
    import transformers

    from pill.llm import load_llm
    from trainer_testing import char_tokenizer

    # The model is what changed with the families; the vocabulary is transformers' conversion, as for a LLaMA
    # GGUF, and a hand-written file's trips some releases' converters.
    load_tokenizer = transformers.AutoTokenizer.from_pretrained
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda path, **kwargs: char_tokenizer()
                        if "gguf_file" in kwargs else load_tokenizer(path, **kwargs))
    vocab = {"vocab_size": 120, "tie_word_embeddings": False}
    # transformers reads no head_dim off a Qwen3 GGUF and assumes the released models' 128.
    for family, overrides in (("qwen2", {}), ("qwen3", {"head_dim": 128})):
        base = make_base(family, dtype=torch.float32, **vocab, **overrides)
        write_gguf(base, tmp_path / f"{family}.gguf")
        model, _ = load_llm(tmp_path / f"{family}.gguf", cache=tmp_path / "cache")
        assert type(model) is type(base)
        for (name, p), (_, q) in zip(base.named_parameters(), model.named_parameters()):
            assert torch.equal(p, q), f"{family}: {name}"
    write_gguf(make_base("qwen3", dtype=torch.float32, **vocab), tmp_path / "narrow.gguf")
    with pytest.raises(UnsupportedBaseError, match=r"narrow.gguf: its Qwen3 weights have heads 12 wide "
                                                   r"\(blk.0.attn_q.weight: 48 rows for 4 heads\), but transformers "
                                                   r"takes head_dim 128"):
        load_llm(tmp_path / "narrow.gguf", cache=tmp_path / "cache")


def test_seed_conversion_is_refused_onto_other_families(tmp_path):
    from pill.convert import convert_seed_checkpoint

    for family in FAMILY_NAMES:
        family_config(family).save_pretrained(tmp_path / family)
        for base in (tmp_path / family, family_config(family)):
            with pytest.raises(ValueError, match=f"is a {family!r} model: the seed checkpoints are LLaMA adapters"):
                convert_seed_checkpoint("pill", tmp_path / "never-read.pth", base, tmp_path / "out")
    assert not (tmp_path / "out").exists()
