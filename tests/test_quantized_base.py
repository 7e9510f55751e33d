"""The methods over a 4-bit NF4 frozen base (bitsandbytes, LaVIN-lite's setting). The oracle is the same method
over a plain float64 model whose projection weights are bitsandbytes' own dequantization of the 4-bit ones
(`dequantize_4bit`): logits, loss and every adapter gradient, for each method and stage; generation against the
no-cache greedy loop over the 4-bit base; adapters moved between base precisions. Without bitsandbytes only the
named error runs."""
import importlib.util
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import pill
from conftest import VOCAB, randomize_adapters
from generation_oracles import greedy_full_recompute
from pill.llm import QuantizedBaseError, load_llm, quantization_config
from test_generation import NEW_TOKENS, left_padded_batch
from test_models import METHODS, batch_for, inject

def test_bitsandbytes_is_installed_where_ci_promises_it():
    if os.environ.get("PILL_TEST_REQUIRE_BITSANDBYTES") != "1":
        pytest.skip("only CI's environment with the lowmem extra promises bitsandbytes")
    assert importlib.util.find_spec("bitsandbytes") is not None, "bitsandbytes is missing: the 4-bit tests skip"


needs_bitsandbytes = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None,
    reason="the 4-bit base needs bitsandbytes, which is not installed: pip install 'pill-kernels[lowmem]'")


def save_llama(directory, **config):
    """A tiny GQA LLaMA saved in float32. Widths are multiples of 32, which bitsandbytes' CPU inference kernel
    needs: `evaluated_base` runs it before the methods are injected."""
    torch.manual_seed(0)
    values = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(LlamaConfig(**{**values, **config})).save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """The checkpoint every 4-bit base and twin below loads."""
    return save_llama(tmp_path_factory.mktemp("base"))


def quantized_base(base_dir):
    return LlamaForCausalLM.from_pretrained(base_dir, quantization_config=quantization_config(4), device_map="cpu",
                                            dtype=torch.float32).eval()


def dequantized_twin(base_dir, quantized):
    """The checkpoint in float64 with every 4-bit projection replaced by bitsandbytes' dequantization of it."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    twin = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float64).eval()
    replaced = 0
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                weight = dequantize_4bit(module.weight.data, module.weight.quant_state)
                twin.get_submodule(name).weight.copy_(weight.to(torch.float64))
                replaced += 1
    assert replaced == 7 * twin.config.num_hidden_layers, f"{replaced} 4-bit projections"
    return twin


def evaluated_base(base_dir):
    """The 4-bit base after one forward in eval mode without gradients (as `pill demo` evaluates the base before
    training it). On a CPU with AVX512-BF16, bitsandbytes repacks the weights for its inference kernel there,
    a layout its training path misreads; injecting a method must undo that."""
    base = quantized_base(base_dir)
    with torch.no_grad():
        base(input_ids=torch.randint(3, VOCAB, (1, 5)))
    return base


def adapted_pair(base_dir, method, stage):
    """(the method over the 4-bit base, the method over its dequantized float64 twin), with the same random
    adapters, in `stage`."""
    quantized = inject(method, evaluated_base(base_dir))
    randomize_adapters(quantized)
    twin = inject(method, dequantized_twin(base_dir, quantized)).to(torch.float64)
    with torch.no_grad():
        mine = pill.adapter_parameters(twin)
        for name, p in pill.adapter_parameters(quantized).items():
            mine[name].copy_(p.to(torch.float64))
    for model in (quantized, twin):
        pill.set_stage(model, stage)
        for p in pill.adapter_parameters(model).values():
            p.requires_grad_(True)
    return quantized, twin


def forward_and_grads(model, ids, features, extra, dtype):
    params = pill.adapter_parameters(model)
    features = features.to(dtype) if features is not None else None
    out = model(input_ids=ids, image_features=features, labels=ids, **extra)
    grads = torch.autograd.grad(out.loss, list(params.values()), allow_unused=True)
    return out.logits.detach(), out.loss.detach(), dict(zip(params, grads))


@needs_bitsandbytes
@pytest.mark.parametrize("method", METHODS)
def test_the_method_over_a_4bit_base_equals_it_over_the_dequantized_weights(base_dir, method):
    quantized = inject(method, quantized_base(base_dir))
    for stage in quantized.multimodal.config.stages:
        quantized, twin = adapted_pair(base_dir, method, stage)
        ids, features, extra = batch_for(method)
        logits, loss, grads = forward_and_grads(quantized, ids, features, extra, torch.float32)
        want_logits, want_loss, want_grads = forward_and_grads(twin, ids, features, extra, torch.float64)
        where = f"{method}, stage {stage}"
        torch.testing.assert_close(logits.double(), want_logits.double(), rtol=1e-4, atol=1e-4,
                                   msg=lambda m: f"{where}: {m}")
        torch.testing.assert_close(loss.double(), want_loss.double(), rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{where}: {m}")
        assert any(g is not None for g in grads.values())
        for name, g in grads.items():
            if want_grads[name] is None:
                assert g is None, f"{where}: {name}"
                continue
            assert g is not None, f"{where}: {name} gets no gradient over the 4-bit base"
            scale = want_grads[name].abs().max().clamp_min(1e-6)
            torch.testing.assert_close(g.double() / scale, want_grads[name].double() / scale, rtol=1e-4, atol=1e-4,
                                       msg=lambda m: f"{where}: {name}: {m}")
        # The oracle is the 4-bit weights, not the checkpoint's: the full-precision model answers otherwise.
        full = inject(method, LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float64).eval())
        with torch.no_grad():
            for name, p in pill.adapter_parameters(full).items():
                p.copy_(pill.adapter_parameters(twin)[name])
        pill.set_stage(full, stage)
        full_logits = full(input_ids=ids, image_features=features, **extra).logits.detach()
        assert not torch.allclose(full_logits, want_logits, rtol=1e-4, atol=1e-4), where


def repacked_layers(model):
    """The 4-bit layers whose weights are in bitsandbytes' CPU inference layout."""
    return [n for n, m in model.named_modules()
            if getattr(getattr(getattr(m, "weight", None), "quant_state", None), "packing_format_for_cpu", False)]


def packed_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.is_floating_point()}


@needs_bitsandbytes
def test_the_base_evaluated_before_injection_is_repacked_here_and_restored_by_injection(base_dir):
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack 4-bit weights here")
    base = evaluated_base(base_dir)
    assert repacked_layers(base), "the evaluation no longer repacks the weights: evaluated_base tests nothing"
    model = inject("pill", base)
    assert not repacked_layers(model)


@needs_bitsandbytes
@pytest.mark.parametrize("method", METHODS)
def test_generation_over_a_4bit_base_equals_the_greedy_loop(base_dir, method):
    model = inject(method, quantized_base(base_dir))
    randomize_adapters(model)
    pill.set_stage(model, model.multimodal.config.stages[-1])
    ids, mask, inputs = left_padded_batch(method)
    inputs = {k: v.float() if v.is_floating_point() else v for k, v in inputs.items()}
    expected = greedy_full_recompute(model, ids, mask, NEW_TOKENS, **inputs)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True,
                         eos_token_id=None, pad_token_id=0, **inputs)
    assert torch.equal(got, expected), f"generate:\n{got[:, ids.shape[1]:]}\ngreedy loop:\n{expected[:, ids.shape[1]:]}"


@needs_bitsandbytes
@pytest.mark.parametrize("method", METHODS)
def test_an_adapter_moves_between_a_4bit_and_a_full_precision_base(base_dir, method, tmp_path):
    """Adapters are base-agnostic files: trained over the 4-bit base, loaded onto the full-precision one and
    back, the tensors are the same and the 4-bit model answers as before."""
    quantized = inject(method, quantized_base(base_dir))
    randomize_adapters(quantized)
    path = pill.save_adapter(quantized, tmp_path / "adapter")
    full = pill.load_pretrained_adapter(LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32), path)
    for name, p in pill.adapter_parameters(quantized).items():
        assert torch.equal(pill.adapter_parameters(full)[name], p), name
    path = pill.save_adapter(full, tmp_path / "from-full")
    again = pill.load_pretrained_adapter(quantized_base(base_dir), path)
    ids, features, extra = batch_for(method)
    features = features.float()
    for model in (quantized, again):
        pill.set_stage(model, model.multimodal.config.stages[-1])
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids, image_features=features, **extra).logits,
                                   quantized(input_ids=ids, image_features=features, **extra).logits,
                                   rtol=0, atol=0)


@needs_bitsandbytes
@pytest.mark.parametrize("method", ["pill", "lavin", "llama_adapter_v2"])
def test_the_trainer_trains_the_adapters_over_a_4bit_base_and_leaves_it_alone(tmp_path, method):
    """Two trainer steps from `load_llm(..., bits=4)`: finite losses near the full-precision base's, the same
    parameters move as over the full-precision base, and the 4-bit weights stay as loaded."""
    from test_trainer import formatter_for, inject as inject_for_trainer
    from trainer_testing import mc_examples, save_tiny_llm
    from pill.trainer import TrainConfig, Trainer

    directory = save_tiny_llm(tmp_path / "llm")

    def run(bits):
        torch.manual_seed(0)
        llm, _ = load_llm(directory, bits=bits)
        model = inject_for_trainer(method, llm)
        frozen = packed_weights(model)
        examples, lookup = mc_examples(6, with_images=True)
        before = {n: p.detach().clone() for n, p in pill.adapter_parameters(model).items()}
        cfg = TrainConfig(stage=model.multimodal.config.stages[-1], output_dir=str(tmp_path / f"run-{bits}"),
                          lr=1e-2, max_steps=2, batch_size=3, warmup_steps=1, progress=False)
        trainer = Trainer(model, formatter_for(model), examples, cfg, features=lookup)
        losses = [trainer.train_step()["loss"] for _ in range(cfg.max_steps)]
        moved = {n for n, p in pill.adapter_parameters(model).items() if not torch.equal(p, before[n])}
        for name, weight in packed_weights(model).items():
            assert torch.equal(weight, frozen[name]), f"{name}: the 4-bit base changed"
        return losses, moved, frozen

    losses, moved, frozen = run(4)
    full_losses, full_moved, _ = run(None)
    assert frozen, "no 4-bit weights in the base load_llm(bits=4) gave"
    assert moved and moved == full_moved
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(full_losses), rtol=0.05, atol=0.05)


@needs_bitsandbytes
@pytest.mark.parametrize("method", ["pill", "llama_adapter_v2"])
def test_a_bf16_compute_dtype_over_a_4bit_base(tmp_path, method):
    """set_compute_dtype reaches the 4-bit projections (they dequantize to bf16), the adapters stay fp32 and
    get gradients (LLaMA-Adapter V2's tuned biases too, which bitsandbytes would cast in place), and the logits
    stay within bf16's error of the float64 twin's."""
    save_llama(tmp_path)
    quantized, twin = adapted_pair(tmp_path, method, 2)
    pill.set_compute_dtype(quantized, "bfloat16")
    projections = [m for m in quantized.model.layers.modules() if hasattr(m, "quant_state") or
                   (hasattr(m, "weight") and not m.weight.is_floating_point())]
    assert projections and all(m.compute_dtype == torch.bfloat16 for m in projections)
    ids, features, extra = batch_for(method)
    logits, _, grads = forward_and_grads(quantized, ids, features, extra, torch.float32)
    want, _, _ = forward_and_grads(twin, ids, features, extra, torch.float64)
    assert all(p.dtype == torch.float32 for p in pill.adapter_parameters(quantized).values())
    assert all(g is not None for n, g in grads.items() if quantized.get_parameter(n).requires_grad)
    error = (logits.double() - want).abs().max() / want.abs().max()
    assert error < 0.05, f"relative error {error:.3g} against the float64 twin"


def test_a_quantized_base_without_bitsandbytes_is_a_named_error(monkeypatch, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", None)  # `import bitsandbytes` fails
    with pytest.raises(QuantizedBaseError, match=r"bits=4: a 4-bit frozen base needs bitsandbytes.*"
                                                 r"pip install 'pill-kernels\[lowmem\]'"):
        quantization_config(4)
    with pytest.raises(QuantizedBaseError, match="needs bitsandbytes"):
        load_llm(tmp_path / "never-read", bits=4)  # refused before any file is read
    with pytest.raises(QuantizedBaseError, match=r"bits=8: the quantized frozen base supports bits = 4"):
        quantization_config(8)
