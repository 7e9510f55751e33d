"""Sequence packing: a packed batch gives every example what it gets alone (logits, loss, every adapter gradient,
in float64, for each method on the eager backend and the Triton kernels under the interpreter); no example sees
another; the trainer with packing reaches the parameters of the unpacked trainer; bad input is refused."""
import pytest
import torch

import pill
from pill.data import IGNORE, Collator, PromptFormatter
from pill.packing import PackedCollator, first_fit, positions_in_segments, row_examples
from pill.trainer import TrainConfig, Trainer
from trainer_testing import VOCAB, char_tokenizer, mc_examples, tiny_llm

IMAGE_ID = VOCAB + 1
DIM = 8
TOKENS = 3
METHODS = ["pill", "pill_query_head", "pill_stage1", "lavin", "llama_adapter_v2", "llama_adapter_v2_1"]


def make_model(method, attn="sdpa"):
    llm = tiny_llm(seed=3, dtype=torch.float64)
    llm.config._attn_implementation = attn
    if method.startswith("pill"):
        config = pill.PillConfig(adapter_dim=4, gate_per="query_head" if method == "pill_query_head" else "kv_head")
        model = pill.inject_pill(llm, config, vision_dim=DIM, image_token_id=IMAGE_ID)
    elif method == "lavin":
        model = pill.inject_lavin(llm, pill.LavinConfig(adapter_dim=4, dropout=0.0), vision_dim=DIM,
                                  image_token_id=IMAGE_ID)
    else:
        model = pill.inject_llama_adapter_v2(llm, pill.LlamaAdapterV2Config(
            prompt_len=3, visual_blocks=1, visual_heads=2, lora_rank=2 if method.endswith("_1") else 0,
            new_gate=method.endswith("_1")), vision_dim=DIM)
    model.set_stage(1 if method in ("pill_stage1", "lavin") else 2)
    model.to(torch.float64)  # the adapters are created in fp32
    torch.manual_seed(7)
    with torch.no_grad():  # zero-initialised adapters would hide mistakes
        for name, p in pill.adapter_parameters(model).items():
            p.copy_((1.0 if "norm" in name and "multimodal" not in name else 0.0) + 0.3 * torch.randn_like(p))
    return model


def examples_of_several_lengths():
    """Image and text-only examples whose token counts vary several-fold."""
    with_images, lookup = mc_examples(4, seed=1, tokens=TOKENS, dim=DIM)
    text_only, _ = mc_examples(3, seed=2, tokens=TOKENS, dim=DIM, with_images=False)
    examples = [with_images[0], text_only[0], with_images[1], with_images[2], text_only[1], with_images[3],
                text_only[2]]
    for i, extra in enumerate(["", " Think about the colours and shapes.", "", " Why?", "", " Look closely.", ""]):
        examples[i].messages[0]["content"] += extra * (1 + i % 3)
    examples[2].messages[1]["content"] += " Because it is."
    return examples, lookup


def formatter(model):
    mm = model.multimodal
    return PromptFormatter(char_tokenizer(), image_token_id=mm.image_token_id,
                           image_tokens=TOKENS if mm.image_token_id is not None else 0)


def short_encodings(model, examples):
    """(ids, labels) of 9 to 29 tokens per example, image placeholders where the method takes them: rows short
    enough for the Triton interpreter, several key blocks (16) long."""
    gen = torch.Generator().manual_seed(5)
    encoded = []
    for i, example in enumerate(examples):
        length = 9 + (7 * i) % 21
        image = [IMAGE_ID] * TOKENS if example.image_ids and model.multimodal.image_token_id is not None else []
        ids = [1] + image + torch.randint(3, VOCAB, (length - 1 - len(image),), generator=gen).tolist()
        labels = [IGNORE] * (length // 2) + ids[length // 2:]
        encoded.append((ids, labels))
    return encoded


def collators(model, lookup, max_length):
    per_sequence = model.multimodal.image_token_id is None
    return (Collator(0, lookup, per_sequence_images=per_sequence),
            PackedCollator(0, lookup, per_sequence_images=per_sequence, max_length=max_length))


def summed_loss(model, batch):
    out = model(**batch, logits_to_keep="supervised", use_cache=False)
    return torch.nn.functional.cross_entropy(out.logits, out.targets, reduction="sum")


def run(model, batch):
    """(full logits, summed supervised loss, adapter gradients of that loss)."""
    params = {n: p for n, p in pill.adapter_parameters(model).items() if p.requires_grad}
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    loss = summed_loss(model, batch)
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return logits.detach(), loss.detach(), {n: g for n, g in zip(params, grads) if g is not None}


@pytest.mark.parametrize("method,backend", [(m, "eager") for m in METHODS] + [
    ("pill_query_head", "triton"), ("llama_adapter_v2_1", "triton")])
def test_a_packed_batch_gives_every_example_what_it_gets_alone(method, backend):
    model = make_model(method)
    if backend == "triton":
        # The Triton kernel that packing changes is the gated attention (varlen segments, per-example prompts),
        # which the layers call; the per-token adapters stay eager to keep the interpreter's time down.
        for layer in model.model.layers:
            layer.kernel_backend = backend
    examples, lookup = examples_of_several_lengths()
    encoded = short_encodings(model, examples) if backend == "triton" else [formatter(model).encode(e)
                                                                            for e in examples]
    lengths = [len(ids) for ids, _ in encoded]
    capacity = max(lengths) + min(lengths) + 2
    padded, packed = collators(model, lookup, capacity)
    batch = packed(encoded, examples)
    assert batch["input_ids"].shape[0] < len(examples)  # several examples share rows
    logits, loss, grads = run(model, batch)

    expected_loss, expected_grads = 0.0, {}
    sequence_ids = batch["sequence_ids"]
    for number, i in enumerate(packed.order):
        alone_logits, alone_loss, alone_grads = run(model, padded([encoded[i]], [examples[i]]))
        torch.testing.assert_close(logits[sequence_ids == number], alone_logits[0], rtol=1e-10, atol=1e-10,
                                   msg=lambda m: f"example {i}: {m}")
        expected_loss += alone_loss
        for name, g in alone_grads.items():
            expected_grads[name] = expected_grads.get(name, 0) + g
    torch.testing.assert_close(loss, expected_loss, rtol=1e-10, atol=1e-10)
    assert grads.keys() == expected_grads.keys() and len(grads) > 3
    for name, g in expected_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")

    # The same examples padded into one batch: the loss of the step is the same.
    torch.testing.assert_close(summed_loss(model, padded(encoded, examples)), loss, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", ["pill_query_head", "lavin", "llama_adapter_v2"])
def test_no_example_sees_another(method):
    """Change one example's tokens (and image): the logits of every other example in its row do not move."""
    model = make_model(method, attn="eager")  # the additive mask of the eager implementation
    examples, lookup = examples_of_several_lengths()
    fmt = formatter(model)
    encoded = [fmt.encode(e) for e in examples]
    _, packed = collators(model, lookup, 10_000)  # one row holds them all
    batch = packed(encoded, examples)
    assert batch["input_ids"].shape[0] == 1
    logits = model(**batch).logits
    changed = dict(batch)
    changed["input_ids"] = batch["input_ids"].clone()
    target = batch["sequence_ids"] == 3
    ids = changed["input_ids"][target]
    changed["input_ids"][target] = torch.where(ids == IMAGE_ID, ids, (ids + 5) % VOCAB)
    with_image = [bool(examples[i].image_ids) for i in packed.order]
    assert with_image[3]
    # Its image too: per example for LLaMA-Adapter V2, the placeholders' order for the others.
    image = 3 if model.multimodal.image_token_id is None else sum(with_image[:3])
    changed["image_features"] = batch["image_features"].clone()
    changed["image_features"][image] += 1.0
    moved = model(**changed).logits
    others = batch["sequence_ids"] != 3
    assert not torch.allclose(moved[target], logits[target])
    torch.testing.assert_close(moved[others], logits[others], rtol=0, atol=0)


def test_first_fit_keeps_the_order_and_fills_earlier_rows_first():
    assert first_fit([5, 4, 3, 2, 6, 1], 8) == [[0, 2], [1, 3, 5], [4]]
    assert first_fit([8, 8], 8) == [[0], [1]]
    with pytest.raises(ValueError, match="example 1 has 9 tokens, more than max_length 8"):
        first_fit([3, 9], 8)


def test_the_packed_collator_restarts_positions_and_masks_the_boundaries():
    tokenizer_model = make_model("pill")
    examples, lookup = examples_of_several_lengths()
    fmt = formatter(tokenizer_model)
    encoded = [fmt.encode(e) for e in examples[:3]]
    n0, n1, n2 = (len(ids) for ids, _ in encoded)
    collator = PackedCollator(0, lookup, max_length=n0 + n1)
    batch = collator(encoded, examples[:3])
    assert collator.order == [0, 1, 2]
    assert batch["input_ids"].shape == (2, n0 + n1)
    assert batch["sequence_ids"][0].tolist() == [0] * n0 + [1] * n1
    assert batch["sequence_ids"][1].tolist() == [2] * n2 + [-1] * (n0 + n1 - n2)
    assert batch["position_ids"][0].tolist() == list(range(n0)) + list(range(n1))
    assert batch["labels"][0, n0] == IGNORE and batch["labels"][0, n0 + 1:].tolist() == encoded[1][1][1:]
    assert batch["input_ids"][1, n2:].eq(0).all() and batch["labels"][1, n2:].eq(IGNORE).all()
    # Example 1 has no image: the features are examples 0's and 2's, in row-major order.
    torch.testing.assert_close(batch["image_features"], lookup([examples[0].image_ids[0], examples[2].image_ids[0]]))
    ids = torch.tensor([[4, 4, 4, 7, 7, -1], [9, 9, 2, 2, 2, 2]])
    assert positions_in_segments(ids).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 0, 1, 2, 3]]
    assert row_examples(ids).tolist() == [[4, 7], [9, 2]]


def test_packed_inputs_are_checked():
    model = make_model("pill")
    ids = torch.randint(3, VOCAB, (1, 6))
    seq = torch.tensor([[0, 0, 0, 1, 1, 1]])
    with pytest.raises(ValueError, match="pass attention_mask=None with sequence_ids"):
        model(ids, attention_mask=torch.ones_like(ids), sequence_ids=seq)
    with pytest.raises(ValueError, match=r"sequence_ids must have shape \[batch, seq\] = \(1, 6\)"):
        model(ids, sequence_ids=seq[:, :5])
    with pytest.raises(TypeError, match="sequence_ids must be an integer tensor"):
        model(ids, sequence_ids=seq.float())
    with pytest.raises(ValueError, match="pass no cache and use_cache=False"):
        model(ids, sequence_ids=seq, use_cache=True)
    # No label crosses from one example into the next, whatever the labels say.
    assert model(ids, labels=ids, sequence_ids=seq, logits_to_keep="supervised").targets.tolist() == \
        ids[0, [1, 2, 4, 5]].tolist()
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="packed rows need attn_implementation 'sdpa' or 'eager'"):
        model(ids, sequence_ids=seq)
    examples, lookup = examples_of_several_lengths()
    examples[1].where = "data.jsonl:2"
    with pytest.raises(ValueError, match=r"data.jsonl:2: \d+ tokens, more than max_length 100: the example cannot be "
                                         r"packed"):
        PackedCollator(0, lookup, max_length=100)([formatter(model).encode(e) for e in examples[:2]], examples[:2])


@pytest.mark.parametrize("method", ["pill", "lavin", "llama_adapter_v2"])
def test_training_with_packing_reaches_the_parameters_of_training_without(method, tmp_path):
    """Packing changes the layout of a step, not what it computes: two steps of 2 micro-batches each, packed
    and padded, end at the same adapter (float64)."""
    finals = []
    for packing in (False, True):
        model = make_model(method)
        examples, lookup = examples_of_several_lengths()
        config = TrainConfig(stage=model.multimodal.stage, output_dir=str(tmp_path / str(packing)), lr=1e-2,
                             max_steps=2, batch_size=3, grad_accum=2, progress=False, packing=packing, seed=4)
        trainer = Trainer(model, formatter(model), examples, config, features=lookup)
        metrics = trainer.train()
        finals.append(({n: p.detach().clone() for n, p in pill.adapter_parameters(model).items()}, metrics))
    (padded, padded_metrics), (packed, packed_metrics) = finals
    for name in padded:
        torch.testing.assert_close(packed[name], padded[name], rtol=1e-9, atol=1e-11, msg=lambda m: f"{name}: {m}")
    assert packed_metrics["loss"] == pytest.approx(padded_metrics["loss"], rel=1e-9)
    assert packed_metrics["tokens"] == padded_metrics["tokens"]  # real tokens, padding not counted
