"""`pill convert` / `pill.convert.convert_seed_checkpoint`: tiny checkpoints in each seed's released layout are
converted, loaded with `pill.load_pretrained_adapter` onto the transformers base, and compared in float64 with
the seed's own forward written over Meta-format weights (tests/seed_checkpoints.py): logits for image and
text-only rows, and greedy generations against a token-by-token argmax loop of that forward. Bad input: a
pickle holding a class outside the allow-list, a missing or misshapen key, an unknown key, LaVIN's
vision-side routers: each refused by name, with no output directory left behind."""
from __future__ import annotations

import argparse
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

import pill
from pill.cli import main as pill_main
from pill.convert import convert_seed_checkpoint
from pill.seed_format import SeedCheckpointError, load_seed_checkpoint, rope_rows_to_hf
from seed_checkpoints import (VOCAB, lavin_checkpoint, lavin_meta_logits, llama_adapter_v2_checkpoint,
                              llama_adapter_v2_meta_logits, meta_logits, meta_weights, pill_checkpoint,
                              pill_meta_logits, tiny_base)

IMAGE_TOKEN = VOCAB  # outside the tiny vocabulary, as the demo's placeholder
VISION_DIM = 16
TOLERANCE = 1e-5  # transformers computes RMSNorm and the rotary tables through fp32 even in a float64 model


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(HF directory, float64 model, its weights in Meta's layout)."""
    model = tiny_base()
    path = tmp_path_factory.mktemp("base") / "tiny-llama"
    model.save_pretrained(path)
    return path, model, meta_weights(model)


def load_base(path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float64).eval()


def load_converted(path, adapter) -> LlamaForCausalLM:
    model = pill.load_pretrained_adapter(load_base(path), adapter, backend="eager")
    return model.double().eval()


def save_seed(tmp_path, state, wrapper="training", name="seed.pth"):
    """torch.save in the seed's wrapper: LaVIN / PILL's training checkpoint (with an argparse.Namespace of
    arguments and the DDP `module.` prefix) or LLaMA-Adapter's {'model', 'config'}."""
    path = tmp_path / name
    if wrapper == "training":
        data = {"model": {f"module.{k}": v for k, v in state.items()}, "optimizer": {}, "epoch": 3,
                "scaler": {}, "args": argparse.Namespace(lr=1e-3, adapter_dim=4)}
    else:
        data = {"model": state, "config": {"w_bias": True, "w_lora": False, "lora_rank": 16}}
    torch.save(data, path)
    return path


def rows(seq=9, image_tokens=2):
    """Two rows, left-padded second; the first holds `image_tokens` placeholders after BOS."""
    ids = torch.randint(3, VOCAB, (2, seq))
    ids[:, 0] = 1
    ids[0, 1:1 + image_tokens] = IMAGE_TOKEN
    ids[1, :2] = 0
    valid = torch.ones(2, seq, dtype=torch.bool)
    valid[1, :2] = False
    return ids, valid


def test_the_harness_meta_forward_is_transformers_forward(base):
    """The Meta-layout base forward (interleaved RoPE, un-permuted wq/wk) equals transformers' model: the
    ground truth below is about the adapters, not the layout."""
    path, model, meta = base
    ids, valid = rows(image_tokens=0)
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)  # as the multimodal model counts them
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=valid.long(), position_ids=positions).logits
    got = meta_logits(meta, model.config, ids, valid)
    assert (got - expected)[valid].abs().max() < TOLERANCE


def test_rope_rows_to_hf_is_transformers_converter_permutation():
    """Against a hand-made case: head_dim 4, one head: Meta rows (0, 1, 2, 3) hold pairs (0, 1) and (2, 3);
    transformers' order puts the first of each pair first: (0, 2, 1, 3)."""
    meta = torch.arange(8.0).reshape(4, 2)
    assert rope_rows_to_hf(meta, heads=1).tolist() == meta[[0, 2, 1, 3]].tolist()
    assert rope_rows_to_hf(torch.arange(8.0), heads=2).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def _greedy_loop(logits_fn, ids, valid, steps):
    """Token-by-token greedy decoding that recomputes the whole sequence every step (no cache)."""
    for _ in range(steps):
        nxt = logits_fn(ids, valid)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
        valid = torch.cat([valid, torch.ones_like(valid[:, :1])], 1)
    return ids


def _generate(model, ids, valid, steps, **kwargs):
    return model.generate(ids, attention_mask=valid.long(), max_new_tokens=steps, min_new_tokens=steps,
                          do_sample=False, pad_token_id=0, eos_token_id=None, **kwargs)


V2_VARIANTS = {"BIAS-7B": {}, "LORA-BIAS-7B": {"lora_rank": 4}, "LORA-BIAS-7B-v21": {"lora_rank": 4, "new_gate": True}}


@pytest.mark.parametrize("variant", list(V2_VARIANTS))
def test_llama_adapter_v2_checkpoint_converts_to_the_seed_model(base, tmp_path, variant):
    path, model, meta = base
    config = model.config
    torch.manual_seed(1)
    state = llama_adapter_v2_checkpoint(config, vision_dim=VISION_DIM, **V2_VARIANTS[variant])
    checkpoint = save_seed(tmp_path, state, wrapper="llama_adapter")
    out = tmp_path / "converted"
    summary = convert_seed_checkpoint("llama_adapter_v2", checkpoint, path, out,
                                      method_config={"visual_heads": 4})
    assert summary["config"]["prompt_len"] == 3 and summary["config"]["visual_blocks"] == 2
    assert summary["config"]["lora_rank"] == V2_VARIANTS[variant].get("lora_rank", 0)
    assert summary["config"]["new_gate"] == V2_VARIANTS[variant].get("new_gate", False)
    converted = load_converted(path, out)
    assert pill.kernel_backend(converted) == "eager"
    ids, valid = rows(image_tokens=0)
    clip = torch.randn(2, 5, VISION_DIM).float().double()
    modality = torch.tensor([True, False])
    with torch.no_grad():
        got = converted(input_ids=ids, attention_mask=valid.long(), image_features=clip,
                        sequence_modality=modality).logits
    with_image = llama_adapter_v2_meta_logits(meta, state, config, ids, valid, clip, visual_heads=4)
    text_only = llama_adapter_v2_meta_logits(meta, state, config, ids, valid, None)
    expected = torch.where(modality[:, None, None], with_image, text_only)
    assert (got - expected)[valid].abs().max() < TOLERANCE * expected.abs().max()
    # Without the q-space permutation (wq.bias, and the rows of the q / k LoRA up-projections) the logits move by
    # far more than the tolerance.
    for key in [k for k in state if k.endswith(("wq.bias", "lora_wq_l2.weight", "lora_wk_l2.weight"))]:
        broken = dict(state)
        broken[key] = rope_rows_to_hf(state[key], config.num_attention_heads)
        assert (got - llama_adapter_v2_meta_logits(meta, broken, config, ids, valid, clip, 4)).abs().max() > 1e-4, key
    if "lora_rank" in V2_VARIANTS[variant]:
        _check_lora_gradients(converted, state, meta, config, ids, valid, clip, modality)

    def seed(ids_, valid_):
        full = llama_adapter_v2_meta_logits(meta, state, config, ids_, valid_, clip, visual_heads=4)
        text = llama_adapter_v2_meta_logits(meta, state, config, ids_, valid_, None)
        return torch.where(modality[:, None, None], full, text)

    generated = _generate(converted, ids, valid, 4, image_features=clip, sequence_modality=modality)
    assert torch.equal(generated, _greedy_loop(seed, ids, valid, 4))


def _check_lora_gradients(converted, state, meta, config, ids, valid, clip, modality):
    """The converted model's stage-2 LoRA gradients equal those of the seed forward's LoRA tensors (the q
    up-projection's rows permuted into transformers' order): the mapping holds for training too."""
    seed = {k: v.clone().requires_grad_(k.endswith(("_l1.weight", "_l2.weight"))) for k, v in state.items()}
    pill.set_stage(converted, 2)
    converted.zero_grad()
    logits = converted(input_ids=ids, attention_mask=valid.long(), image_features=clip,
                       sequence_modality=modality).logits
    logits[valid].square().mean().backward()
    with_image = llama_adapter_v2_meta_logits(meta, seed, config, ids, valid, clip, visual_heads=4)
    text_only = llama_adapter_v2_meta_logits(meta, seed, config, ids, valid, None)
    torch.where(modality[:, None, None], with_image, text_only)[valid].square().mean().backward()
    layer = converted.model.layers[1].pill_lora
    pairs = [(layer.v_proj.lora_b.grad, seed["llama.layers.1.attention.lora_wv_l2.weight"].grad),
             (layer.down_proj.lora_a.grad, seed["llama.layers.1.feed_forward.lora_w2_l1.weight"].grad),
             (layer.q_proj.lora_b.grad,
              rope_rows_to_hf(seed["llama.layers.1.attention.lora_wq_l2.weight"].grad, config.num_attention_heads))]
    for got, expected in pairs:
        assert (got - expected).abs().max() < TOLERANCE * expected.abs().max()


@pytest.mark.parametrize("wrapper", ["training", "plain"])
def test_pill_checkpoint_converts_to_the_seed_model(base, tmp_path, wrapper):
    path, model, meta = base
    config = model.config
    torch.manual_seed(2)
    state = pill_checkpoint(config, vision_dim=VISION_DIM)
    checkpoint = save_seed(tmp_path, state, wrapper=wrapper)
    out = tmp_path / "converted"
    summary = convert_seed_checkpoint("pill", checkpoint, path, out, image_token_id=IMAGE_TOKEN)
    assert summary["config"]["adapter_dim"] == 4 and summary["vision_dim"] == VISION_DIM
    converted = load_converted(path, out)
    assert converted.multimodal.stage == 2
    ids, valid = rows(image_tokens=2)
    queries = torch.randn(1, 2, VISION_DIM).float().double()  # one image of 2 query tokens, in the first row
    with torch.no_grad():
        got = converted(input_ids=ids, attention_mask=valid.long(), image_features=queries).logits
    expected = pill_meta_logits(meta, state, config, ids, valid, IMAGE_TOKEN, queries)
    assert (got - expected)[valid].abs().max() < TOLERANCE * expected.abs().max()
    seed = lambda i, v: pill_meta_logits(meta, state, config, i, v, IMAGE_TOKEN, queries)  # noqa: E731
    generated = _generate(converted, ids, valid, 4, image_features=queries)
    assert torch.equal(generated, _greedy_loop(seed, ids, valid, 4))


def test_lavin_checkpoint_converts_to_the_seed_model(base, tmp_path):
    path, model, meta = base
    config = model.config
    torch.manual_seed(3)
    state = lavin_checkpoint(config, vision_dim=VISION_DIM)
    checkpoint = save_seed(tmp_path, state)
    out = tmp_path / "converted"
    # The tiny base is 32 wide: the seed's temperature (10 for 7B, 5 for 13B) must be given.
    with pytest.raises(SeedCheckpointError, match="give the temperature"):
        convert_seed_checkpoint("lavin", checkpoint, path, out, image_token_id=IMAGE_TOKEN)
    assert not out.exists()
    summary = convert_seed_checkpoint("lavin", checkpoint, path, out, image_token_id=IMAGE_TOKEN,
                                      method_config={"temperature": 5.0})
    assert summary["config"]["groups"] == 2 and summary["config"]["adapter_dim"] == 4
    converted = load_converted(path, out)
    ids, valid = rows(image_tokens=2)
    features = torch.randn(1, 2, VISION_DIM).float().double()
    with torch.no_grad():
        got = converted(input_ids=ids, attention_mask=valid.long(), image_features=features).logits
    expected = lavin_meta_logits(meta, state, config, ids, valid, IMAGE_TOKEN, features, temperature=5.0)
    assert (got - expected)[valid].abs().max() < TOLERANCE * expected.abs().max()
    seed = lambda i, v: lavin_meta_logits(meta, state, config, i, v, IMAGE_TOKEN, features, 5.0)  # noqa: E731
    generated = _generate(converted, ids, valid, 4, image_features=features)
    assert torch.equal(generated, _greedy_loop(seed, ids, valid, 4))


def test_lavin_vision_routers_convert_and_run_inside_the_vision_tower(base, tmp_path):
    """LaVIN's checkpoint with routers in the CLIP blocks converts (`vision_router_blocks`), and the features
    the loaded model encodes through a transformers CLIP tower equal the seed's CLIP forward with its routers
    written out from the checkpoint's own tensors (one image at a time, the seed's batch-1 routing), for a batch
    of images; the cache key follows the routers; `skip_vision_routers` still drops them."""
    import numpy as np
    from transformers import CLIPModel

    from pill.methods.lavin import RoutedVisionEncoder
    from pill.vision import build_encoder
    from seed_checkpoints import lavin_seed_router

    path, model, _ = base
    torch.manual_seed(2)
    state = lavin_checkpoint(model.config, VISION_DIM, vision_routers=2)
    checkpoint = save_seed(tmp_path, state)
    out = tmp_path / "converted"
    summary = convert_seed_checkpoint("lavin", checkpoint, path, out, image_token_id=IMAGE_TOKEN,
                                      method_config={"temperature": 5.0})
    assert any("vision routers in CLIP blocks 0..1" in note for note in summary["notes"])
    converted = pill.load_pretrained_adapter(tiny_base(), out)
    assert converted.multimodal.config.vision_router_blocks == 2

    save_tiny_clip(tmp_path / "clip")
    plain = build_encoder({"type": "hf", "path": str(tmp_path / "clip"), "cls_layers": [1, 2]})
    encoder = converted.multimodal.feature_encoder(plain)
    assert isinstance(encoder, RoutedVisionEncoder) and encoder.key != plain.key
    images = [np.random.rand(40, 30, 3).astype(np.float32) for _ in range(3)]
    clip = CLIPModel.from_pretrained(tmp_path / "clip").eval().double()
    pixels = encoder.preprocess(images).double()
    expected = []
    with torch.no_grad():
        for image in range(3):  # the seed's routing is per token at batch 1
            hooks = [layer.layer_norm1.register_forward_hook(
                lambda m, a, o, i=i: lavin_seed_router(
                    state, f"backbone.visual.transformer.resblocks.{i}.adapter_attn.", o, 5.0).to(o.dtype))
                for i, layer in enumerate(clip.vision_model.encoder.layers)]
            hidden = clip.vision_model(pixel_values=pixels[image:image + 1], output_hidden_states=True).hidden_states
            for hook in hooks:
                hook.remove()
            expected.append(torch.stack([hidden[1][:, 0], hidden[2][:, 0]], 1))
    expected = torch.cat(expected)
    got = encoder.encode(images)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)
    assert (got - plain.encode(images)).abs().max() > 1e-3  # the routers change the features
    key = encoder.key
    with torch.no_grad():  # other router weights, another cache key
        converted.multimodal.vision_routers[1].b_down.add_(0.1)
    assert encoder.key != key
    skipped = tmp_path / "skipped"
    summary = convert_seed_checkpoint("lavin", checkpoint, path, skipped, image_token_id=IMAGE_TOKEN,
                                      method_config={"temperature": 5.0, "skip_vision_routers": True})
    assert any("dropped 16 vision-side" in note for note in summary["notes"])
    assert pill.load_pretrained_adapter(tiny_base(), skipped).multimodal.config.vision_router_blocks == 0


def test_lavin_vision_routers_train_inside_the_graph(tmp_path):
    """With vision routers the model encodes the images itself: the gradients of its image features with
    respect to the routers' parameters equal finite differences (float64 tower; the LLM is left out because
    transformers computes its RMSNorm in fp32), and the trainer, given preprocessed images, moves every router
    parameter through the loss (packed batches too)."""
    import numpy as np

    from pill.data import PromptFormatter
    from pill.trainer import TrainConfig, Trainer
    from pill.vision import HFVisionEncoder
    from trainer_testing import char_tokenizer, mc_examples, tiny_llm

    torch.manual_seed(3)
    save_tiny_clip(tmp_path / "clip")
    encoder = HFVisionEncoder(tmp_path / "clip", cls_layers=[1, 2], dtype=torch.float64)
    model = pill.inject_lavin(tiny_llm(dtype=torch.float64), pill.LavinConfig(adapter_dim=4, dropout=0.0,
                                                                              vision_router_blocks=2),
                              vision_dim=16, image_token_id=IMAGE_TOKEN, vision_encoder=encoder).double()
    assert model.multimodal.takes_pixels
    with torch.no_grad():
        for name, p in pill.adapter_parameters(model).items():
            p.normal_(0.0, 0.3)
    pixels = encoder.preprocess([np.random.rand(30, 30, 3).astype(np.float32) for _ in range(2)]).double()
    names = ["vision_routers.0.w_down", "vision_routers.0.b_up", "vision_routers.1.router.weight",
             "vision_routers.1.w_up_grouped"]
    params = dict(model.multimodal.named_parameters())

    class Encode(torch.nn.Module):
        def __init__(self, mm):
            super().__init__()
            self.mm = mm

        def forward(self, images):
            return self.mm.encode_images(images)

    def features(*tensors):
        return torch.func.functional_call(Encode(model.multimodal), {f"mm.{n}": t for n, t in zip(names, tensors)},
                                          (pixels,))

    assert torch.autograd.gradcheck(features, [params[n].detach().clone().requires_grad_() for n in names])

    examples, _ = mc_examples(4, tokens=2, dim=16)
    store = {key: torch.rand(3, 32, 32, dtype=torch.float64) for ex in examples for key in ex.image_ids}
    formatter = PromptFormatter(char_tokenizer(), image_token_id=IMAGE_TOKEN, image_tokens=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if ".vision_routers." in n}
    for packing in (False, True):
        trainer = Trainer(model, formatter, examples,
                          TrainConfig(output_dir=str(tmp_path / f"run{packing}"), lr=1e-2, max_steps=1,
                                      batch_size=4, progress=False, packing=packing, dtype="float32"),
                          features=lambda keys: torch.stack([store[k] for k in keys]))
        assert "images" in trainer._batch([0, 1])
        trainer.train()
    moved = [n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert len(moved) == len(before) > 0


class Unexpected:
    """Not in the allow-list."""

    def __init__(self):
        self.value = 1


def test_a_pickle_with_a_class_outside_the_allow_list_is_refused_by_name(base, tmp_path):
    path, model, _ = base
    checkpoint = tmp_path / "evil.pth"
    torch.save({"model": pill_checkpoint(model.config, VISION_DIM), "args": Unexpected()}, checkpoint)
    out = tmp_path / "converted"
    with pytest.raises(SeedCheckpointError, match=r"Unexpected.*--trust-pickle"):
        convert_seed_checkpoint("pill", checkpoint, path, out, image_token_id=IMAGE_TOKEN)
    assert not out.exists() and list(tmp_path.iterdir()) == [checkpoint]
    # The allow-listed Namespace alone loads; the user can accept the risk for anything else.
    assert isinstance(load_seed_checkpoint(save_seed(tmp_path, {"w": torch.ones(1)}))["args"], argparse.Namespace)
    convert_seed_checkpoint("pill", checkpoint, path, out, image_token_id=IMAGE_TOKEN, trust_pickle=True)
    assert (out / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("content, message", [
    (b"\x00garbage" * 50, r"not a readable torch checkpoint \(the unpickler stopped: Unsupported operand"),
    ("truncated", r"not a readable torch checkpoint \(RuntimeError"),
])
def test_a_damaged_pickle_is_named_as_unreadable_not_as_a_refused_class(tmp_path, content, message):
    path = tmp_path / "seed.pth"
    if content == "truncated":
        torch.save({"model": {"w": torch.ones(64)}}, path)
        content = path.read_bytes()[:200]
    path.write_bytes(content)
    with pytest.raises(SeedCheckpointError, match=message) as error:
        load_seed_checkpoint(path)
    assert "--trust-pickle" not in str(error.value)


@pytest.mark.parametrize("damage, message", [
    ("missing", r"missing key\(s\): layers\.1\.txt_adapter_ffn\.up_sampler\.weight"),
    ("misshapen", r"unexpected shape\(s\): layers\.0\.attention\.vis_adapter_gate\.weight: expected \(4, 32\), "
                  r"found \(4, 31\)"),
    ("unknown", r"unknown key\(s\): layers\.0\.adapter_attn\.extra\.weight"),
])
def test_a_damaged_checkpoint_names_the_key_and_writes_nothing(base, tmp_path, damage, message):
    path, model, _ = base
    state = pill_checkpoint(model.config, VISION_DIM)
    if damage == "missing":
        del state["layers.1.txt_adapter_ffn.up_sampler.weight"]
    elif damage == "misshapen":
        state["layers.0.attention.vis_adapter_gate.weight"] = torch.zeros(4, 31, dtype=torch.float64)
    else:
        state["layers.0.adapter_attn.extra.weight"] = torch.zeros(2)
    checkpoint = save_seed(tmp_path, state)
    out = tmp_path / "converted"
    with pytest.raises(SeedCheckpointError, match=message):
        convert_seed_checkpoint("pill", checkpoint, path, out, image_token_id=IMAGE_TOKEN)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seed.pth"]


def test_pill_convert_cli_then_load_and_generate(base, tmp_path, capsys):
    """The command as a user runs it: the adapter directory holds the PEFT-like pair and the run record naming
    the base, and the adapter loads onto the base without the conversion's options."""
    path, model, _ = base
    checkpoint = save_seed(tmp_path, pill_checkpoint(model.config, VISION_DIM))
    out = tmp_path / "adapter"
    code = pill_main(["convert", "--method", "pill", "--checkpoint", str(checkpoint), "--base", str(path),
                      "--output", str(out), "--image-token-id", str(IMAGE_TOKEN)])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "adapter_dim 4" in printed and str(out) in printed
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                     "pill_run.json"]
    assert json.loads((out / "pill_run.json").read_text())["llm"] == str(path.resolve())
    converted = load_converted(path, out)
    ids, valid = rows(image_tokens=2)
    out_ids = _generate(converted, ids, valid, 2, image_features=torch.randn(1, 2, VISION_DIM).double())
    assert out_ids.shape == (2, ids.shape[1] + 2)
    # Errors reach the user as one line naming the problem, exit status 2.
    code = pill_main(["convert", "--method", "pill", "--checkpoint", str(tmp_path / "none.pth"), "--base",
                      str(path), "--output", str(tmp_path / "x")])
    assert code == 2 and "seed checkpoint not found" in capsys.readouterr().err


def test_every_method_has_a_seed_converter():
    assert all(m.convert_seed is not None for m in pill.methods.METHODS.values())


def save_tiny_clip(path):
    """A CLIP checkpoint (vision tower 16 wide, 2 layers, 32 px images in 16 px patches, projection to 12) with
    its image processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    config = CLIPConfig(text_config={"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
                                     "num_attention_heads": 2},
                        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                                       "num_attention_heads": 2, "image_size": 32, "patch_size": 16},
                        projection_dim=12)
    CLIPModel(config).save_pretrained(path, safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)


def _openai_clip_tokens(clip, pixels, cls_after=None):
    """The seed's `clip_encode_image` (OpenAI CLIP's VisionTransformer with ln_post and proj on every token),
    written from its equations over a transformers CLIPModel's weights: patch convolution, class token and
    positions, ln_pre, residual blocks (multi-head attention, QuickGELU MLP), ln_post, then ``@ proj``. With
    `cls_after` (1-based block numbers): LaVIN's encoding instead, the class token after each of those blocks,
    before ln_post."""
    v = clip.vision_model
    emb = v.embeddings
    patch = emb.patch_embedding.weight.shape[-1]
    x = F.conv2d(pixels, emb.patch_embedding.weight, stride=patch).flatten(2).transpose(1, 2)
    x = torch.cat([emb.class_embedding.expand(x.shape[0], 1, -1), x], 1) + emb.position_embedding.weight
    ln = lambda t, m: F.layer_norm(t, t.shape[-1:], m.weight, m.bias, m.eps)  # noqa: E731
    x = ln(x, v.pre_layrnorm)
    collected = []
    for number, block in enumerate(v.encoder.layers, 1):
        a = block.self_attn
        h = ln(x, block.layer_norm1)
        b, n, c = h.shape
        heads = a.num_heads
        q, k, w = (F.linear(h, p.weight, p.bias).view(b, n, heads, c // heads).transpose(1, 2)
                   for p in (a.q_proj, a.k_proj, a.v_proj))
        o = torch.softmax(q @ k.transpose(-1, -2) * (c // heads) ** -0.5, -1) @ w
        x = x + F.linear(o.transpose(1, 2).reshape(b, n, c), a.out_proj.weight, a.out_proj.bias)
        h = F.linear(ln(x, block.layer_norm2), block.mlp.fc1.weight, block.mlp.fc1.bias)
        x = x + F.linear(h * torch.sigmoid(1.702 * h), block.mlp.fc2.weight, block.mlp.fc2.bias)
        if cls_after is not None and number in cls_after:
            collected.append(x[:, 0])
    if cls_after is not None:
        return torch.stack(collected, dim=1)
    return ln(x, v.post_layernorm) @ clip.visual_projection.weight.t()


def test_lavin_clip_path_is_the_seeds(tmp_path):
    """`vision: {type: hf, cls_layers: [...]}` gives LaVIN's image features: the class token after each listed
    block, before the post-layernorm (the seed: after blocks 4, 8, ..., 24 of ViT-L/14), equal to the seed's CLIP
    forward written out here; the cache tells the encodings apart."""
    import numpy as np
    from transformers import CLIPModel

    from pill.vision import build_encoder

    torch.manual_seed(0)
    save_tiny_clip(tmp_path / "clip")
    encoder = build_encoder({"type": "hf", "path": str(tmp_path / "clip"), "cls_layers": [1, 2]})
    assert encoder.feature_dim == 16 and encoder.num_tokens == 2
    images = [np.random.rand(40, 30, 3).astype(np.float32) for _ in range(2)]
    clip = CLIPModel.from_pretrained(tmp_path / "clip").eval()
    with torch.no_grad():
        expected = _openai_clip_tokens(clip, encoder.preprocess(images), cls_after=(1, 2))
    torch.testing.assert_close(encoder.encode(images), expected, rtol=1e-5, atol=1e-5)
    last_only = build_encoder({"type": "hf", "path": str(tmp_path / "clip"), "cls_layers": [2]})
    assert last_only.key != encoder.key != build_encoder({"type": "hf", "path": str(tmp_path / "clip")}).key
    for bad in ([0, 2], [3], [], "4"):
        with pytest.raises(ValueError, match=r"cls_layers must be a non-empty list of block numbers in 1\.\.2"):
            build_encoder({"type": "hf", "path": str(tmp_path / "clip"), "cls_layers": bad})
    with pytest.raises(ValueError, match="cls_layers takes the CLS token of the listed blocks"):
        build_encoder({"type": "hf", "path": str(tmp_path / "clip"), "cls_layers": [2], "drop_cls": True})


def test_llama_adapter_v2_clip_path_is_the_seeds(tmp_path):
    """`vision: {type: hf, projected: true}` gives LLaMA-Adapter V2's image features: every token (CLS
    included) after the post-layernorm and the projection, equal to the seed's CLIP path written out here."""
    import numpy as np
    from transformers import CLIPModel

    from pill.vision import build_encoder

    torch.manual_seed(0)
    save_tiny_clip(tmp_path / "clip")
    encoder = build_encoder({"type": "hf", "path": str(tmp_path / "clip"), "projected": True})
    assert encoder.feature_dim == 12 and encoder.num_tokens == 5  # (32/16)^2 patches and CLS, as 16^2 + 1 = 257
    images = [np.random.rand(40, 30, 3).astype(np.float32) for _ in range(2)]
    clip = CLIPModel.from_pretrained(tmp_path / "clip").eval()
    with torch.no_grad():
        expected = _openai_clip_tokens(clip, encoder.preprocess(images))
    torch.testing.assert_close(encoder.encode(images), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="feature_layer must be -1"):
        build_encoder({"type": "hf", "path": str(tmp_path / "clip"), "projected": True, "feature_layer": -2})


@pytest.mark.parametrize("name", ["pill_stage1_cc595k", "pill_stage2_scienceqa", "lavin_7b_scienceqa",
                                  "llama_adapter_v2_scienceqa"])
def test_the_reproduction_recipes_are_valid_run_configs(name):
    """examples/reproduce/*.yaml pass the run config's key checks, their train sections and method configs build,
    and the learning rate the seed's rule gives is the seed's (blr x effective batch / 256)."""
    from pathlib import Path

    from pill.recipe import load_run_config
    from pill.trainer import TrainConfig

    config = load_run_config(Path(__file__).resolve().parents[1] / "examples" / "reproduce" / f"{name}.yaml")
    method = pill.methods.get_method(config["method"])
    method.config_class.from_dict(config.get("method_config") or {})
    train = TrainConfig.from_dict(config["train"])
    seed_lr = {"pill_stage1_cc595k": 5e-4, "pill_stage2_scienceqa": 2.5e-4, "lavin_7b_scienceqa": 1.125e-3,
               "llama_adapter_v2_scienceqa": 1.25e-4}[name]
    assert train.blr * train.batch_size * train.grad_accum / 256 == pytest.approx(seed_lr)


def test_a_bad_method_config_field_is_named(base, tmp_path, capsys):
    path, model, _ = base
    checkpoint = save_seed(tmp_path, pill_checkpoint(model.config, VISION_DIM))
    code = pill_main(["convert", "--method", "pill", "--checkpoint", str(checkpoint), "--base", str(path),
                      "--output", str(tmp_path / "out"), "--method-config", '{"bottleneck": 8}'])
    assert code == 2 and "unknown keys ['bottleneck']" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_meta_format_base_is_answered_with_the_command_to_run(base, tmp_path):
    """--base pointing at Meta's params.json + consolidated.00.pth says exactly which converter to run, for which
    size and version, and writes nothing."""
    path, model, _ = base
    meta_dir = tmp_path / "llama-2-7b"
    meta_dir.mkdir()
    (meta_dir / "params.json").write_text(json.dumps({"dim": 4096, "n_layers": 32, "n_heads": 32,
                                                      "norm_eps": 1e-5, "vocab_size": -1}))
    (meta_dir / "consolidated.00.pth").write_bytes(b"")
    checkpoint = save_seed(tmp_path, pill_checkpoint(model.config, VISION_DIM))
    with pytest.raises(SeedCheckpointError, match=r"convert_llama_weights_to_hf\.py --input_dir .*llama-2-7b "
                                                  r"--model_size 7B --llama_version 2 --output_dir"):
        convert_seed_checkpoint("pill", checkpoint, meta_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_pill_vision_side_blip2_qformer_gives_the_query_tokens(tmp_path):
    """`vision: {type: blip2-qformer}` on a local BLIP-2 checkpoint gives transformers' own Q-Former output (the
    full Blip2Model's get_qformer_features, language model included) while reading only the vision model, the
    Q-Former and the queries: [N, num_query_tokens, qformer width], PILL's projector input."""
    import numpy as np
    from transformers import BlipImageProcessor, Blip2Config, Blip2Model

    from pill.vision import build_encoder

    torch.manual_seed(0)
    config = Blip2Config(vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                                        "num_attention_heads": 2, "image_size": 32, "patch_size": 16},
                         qformer_config={"hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 2,
                                         "num_attention_heads": 2, "cross_attention_frequency": 2},
                         text_config={"model_type": "opt", "hidden_size": 8, "ffn_dim": 16, "num_hidden_layers": 1,
                                      "num_attention_heads": 2, "vocab_size": 50, "word_embed_proj_dim": 8},
                         num_query_tokens=6)
    blip2 = Blip2Model(config).eval()
    with torch.no_grad():
        blip2.query_tokens.normal_()  # transformers may initialise them to zero, which would hide a loading bug
    blip2.save_pretrained(tmp_path / "blip2", safe_serialization=True)
    BlipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "blip2")
    encoder = build_encoder({"type": "blip2-qformer", "path": str(tmp_path / "blip2")})
    assert encoder.feature_dim == 24 and encoder.num_tokens == 6
    images = [np.random.rand(40, 30, 3).astype(np.float32) for _ in range(3)]
    reference = Blip2Model.from_pretrained(tmp_path / "blip2").eval()
    with torch.no_grad():
        expected = reference.get_qformer_features(pixel_values=encoder.preprocess(images))
    expected = getattr(expected, "last_hidden_state", expected)
    got = encoder.encode(images)
    assert got.shape == (3, 6, 24)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


CLI_VARIANTS = {
    "pill": ("pill", lambda c, v: pill_checkpoint(c, v), {"feature_layer": -1}, {}),
    "lavin": ("lavin", lambda c, v: lavin_checkpoint(c, v), {"feature_layer": -1}, {"temperature": 5.0}),
    # with routers in both CLIP blocks, encoded as the seed does (the CLS token after each block)
    "lavin-vision-routers": ("lavin", lambda c, v: lavin_checkpoint(c, v, vision_routers=2), {"cls_layers": [1, 2]},
                             {"temperature": 5.0}),
    "BIAS-7B": ("llama_adapter_v2", lambda c, v: llama_adapter_v2_checkpoint(c, v), {"projected": True},
                {"visual_heads": 4}),
    "LORA-BIAS-7B-v21": ("llama_adapter_v2", lambda c, v: llama_adapter_v2_checkpoint(c, v, lora_rank=2,
                                                                                      new_gate=True),
                         {"projected": True}, {"visual_heads": 4}),
}


@pytest.mark.parametrize("variant", list(CLI_VARIANTS))
def test_convert_then_pill_eval_and_pill_generate_on_image_files(tmp_path, capsys, variant):
    """What a user of a released model runs: `pill convert` (with the vision encoder and prompt to record),
    then `pill eval` on a config that names only the data, and `pill generate` on a PNG, whose answer is the
    greedy full-recompute loop's. A tiny LLaMA with GQA and a tokenizer, a tiny CLIP checkpoint."""
    from PIL import Image
    from transformers import LlamaConfig

    from test_cli import _greedy_answer_of_saved_adapter
    from trainer_testing import save_tiny_llm

    method, make_checkpoint, vision_options, method_config = CLI_VARIANTS[variant]
    save_tiny_llm(tmp_path / "llm")
    save_tiny_clip(tmp_path / "clip")
    vision = {"type": "hf", "path": str(tmp_path / "clip"), **vision_options}
    vision_dim = 12 if vision_options.get("projected") else 16
    torch.manual_seed(4)
    state = make_checkpoint(LlamaConfig.from_pretrained(tmp_path / "llm"), vision_dim)
    checkpoint = save_seed(tmp_path, {k: v.float() for k, v in state.items()},
                           wrapper="llama_adapter" if method == "llama_adapter_v2" else "training")
    adapter = tmp_path / "adapter"
    assert pill_main(["convert", "--method", method, "--checkpoint", str(checkpoint), "--base",
                      str(tmp_path / "llm"), "--output", str(adapter), "--vision", json.dumps(vision),
                      "--prompt", json.dumps({"format": "chat", "max_length": 128}),
                      "--method-config", json.dumps(method_config)]) == 0, capsys.readouterr().err
    (tmp_path / "img").mkdir()
    lines = []
    for i, (name, rgb) in enumerate({"red": (220, 20, 20), "green": (20, 200, 30), "blue": (20, 30, 220),
                                     "white": (250, 250, 250)}.items()):
        Image.new("RGB", (20, 20), rgb).save(tmp_path / "img" / f"{name}.png")
        lines.append(json.dumps({"id": i, "image": f"img/{name}.png", "choices": ["red", "green"], "answer": "A",
                                 "conversations": [{"from": "human", "value": "<image>\nColour? (A) red (B) green"},
                                                   {"from": "gpt", "value": "The answer is A."}]}))
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "eval.json").write_text(json.dumps({
        "data": {"eval": {"type": "conversations", "path": "data.jsonl"}}, "eval": {"batch_size": 4,
                                                                                  "max_new_tokens": 6},
        "cache_dir": "cache"}))
    capsys.readouterr()
    assert pill_main(["eval", str(tmp_path / "eval.json"), "--adapter", str(adapter), "--output",
                      str(tmp_path / "result.json"), "--no-progress"]) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "result.json").read_text())["total"] == 4
    if variant == "lavin-vision-routers":  # pill eval encoded through the routed tower
        names = [p.name for p in (tmp_path / "cache" / "features").iterdir()]
        assert len(names) == 1 and "-lavin-routers-" in names[0], names
    capsys.readouterr()
    image = tmp_path / "img" / "blue.png"
    assert pill_main(["generate", "--adapter", str(adapter), "--image", str(image), "--question", "Colour?",
                      "--max-new-tokens", "6"]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert printed[:-1] == _greedy_answer_of_saved_adapter(adapter, image, "Colour?", 6)
    if variant == "lavin-vision-routers":  # `pill train` goes on from the converted model, routers included
        from safetensors.torch import load_file

        (tmp_path / "train.json").write_text(json.dumps({
            "llm": "llm", "vision": vision, "method": "lavin", "init_adapter": "adapter",
            "method_config": pill.read_adapter_config(adapter)["config"],
            "prompt": {"format": "chat", "max_length": 128},
            "data": {"train": {"type": "conversations", "path": "data.jsonl"}},
            "train": {"stage": 1, "output_dir": "run", "max_steps": 2, "batch_size": 2, "lr": 1e-2, "progress": False,
                      "packing": True},
            "cache_dir": "cache"}))
        assert pill_main(["train", str(tmp_path / "train.json")]) == 0, capsys.readouterr().err
        start = load_file(adapter / "adapter_model.safetensors")
        trained = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
        routers = [n for n in start if n.startswith("multimodal.vision_routers.")]
        assert routers and all(not torch.equal(start[n], trained[n]) for n in routers)
