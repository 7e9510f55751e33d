"""Trainer, data formatting, evaluation: answer-only loss, exact resume, gradient accumulation, checkpoints,
bad data."""
import dataclasses
import json
import os

import pytest
import torch

import pill
from pill.data import (IGNORE, Collator, DataError, Example, PromptFormatter, load_conversations,
                       load_scienceqa)
from pill.evaluate import evaluate_multiple_choice, parse_answer
from pill.trainer import TrainConfig, Trainer, checkpoints, cosine_lr, latest_checkpoint
from trainer_testing import VOCAB, char_tokenizer, mc_examples, tiny_llm

IMAGE_ID = VOCAB + 1
DIM = 8


def inject(method, llm, tokens=2):
    if method == "pill":
        return pill.inject_pill(llm, pill.PillConfig(adapter_dim=4), vision_dim=DIM, image_token_id=IMAGE_ID)
    if method == "lavin":
        return pill.inject_lavin(llm, pill.LavinConfig(adapter_dim=4), vision_dim=DIM, image_token_id=IMAGE_ID)
    return pill.inject_llama_adapter_v2(llm, pill.LlamaAdapterV2Config(prompt_len=2, visual_blocks=1,
                                                                        visual_heads=2), vision_dim=DIM)


def formatter_for(model, tokens=2, **kw):
    mm = model.multimodal
    return PromptFormatter(char_tokenizer(), image_token_id=mm.image_token_id,
                           image_tokens=tokens if mm.image_token_id is not None else 0, **kw)


def test_formatter_supervises_the_answer_and_its_end_token_only():
    fmt = PromptFormatter(char_tokenizer(), image_token_id=IMAGE_ID, image_tokens=3)
    examples, _ = mc_examples(1)
    ids, labels = fmt.encode(examples[0])
    assert ids.count(IMAGE_ID) == 3
    supervised = fmt.tokenizer.decode([i for i, lab in zip(ids, labels) if lab != IGNORE])
    assert supervised == examples[0].messages[-1]["content"] + "<|im_end|>"
    assert all(lab == i for i, lab in zip(ids, labels) if lab != IGNORE)
    prompt = fmt.encode_prompt(examples[0])
    assert ids[:len(prompt)] == prompt and all(lab == IGNORE for lab in labels[:len(prompt)])


def test_formatter_multi_turn_masks_every_user_turn():
    fmt = PromptFormatter(char_tokenizer(), image_token_id=None, image_tokens=0, prompt_format="plain")
    ex = Example([{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                  {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}])
    ids, labels = fmt.encode(ex)
    text = fmt.tokenizer.decode([i if lab != IGNORE else fmt.tokenizer.convert_tokens_to_ids("#")
                                 for i, lab in zip(ids, labels)])
    assert text.replace("#", "") == "a1<|im_end|>a2<|im_end|>"


def test_collator_left_pads_so_answers_end_together():
    fmt = PromptFormatter(char_tokenizer(), image_token_id=IMAGE_ID, image_tokens=2)
    examples, lookup = mc_examples(3)
    examples[1].messages[0]["content"] += " and a longer question"
    batch = Collator(0, lookup)([fmt.encode(e) for e in examples], examples)
    assert (batch["labels"][:, -1] != IGNORE).all()
    assert batch["image_features"].shape == (3, 2, 8)
    lengths = batch["attention_mask"].sum(1)
    assert lengths.max() == batch["input_ids"].shape[1] and lengths.min() < lengths.max()
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 0).all()


def test_trainer_loss_equals_the_full_logits_loss():
    model = inject("pill", tiny_llm(dtype=torch.float64))
    examples, lookup = mc_examples(5)
    trainer = Trainer(model, formatter_for(model), examples, TrainConfig(output_dir="unused", progress=False),
                      features=lookup)
    batch = trainer._batch(list(range(5)))
    hf_loss = model(**batch).loss  # transformers' own shifted cross-entropy over all positions (in fp32)
    labels = batch.pop("labels")
    logits = model(**batch).logits
    reference = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                  labels[:, 1:].reshape(-1), ignore_index=IGNORE)
    batch["labels"] = labels
    loss_sum, n = trainer._loss_sum(dict(batch))
    torch.testing.assert_close(loss_sum / n, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close((loss_sum / n).float(), hf_loss, rtol=1e-6, atol=1e-6)


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """Micro-batches of different token counts: the accumulated gradient is still the mean over all tokens."""
    grads = []
    for batch_size, accum in ((4, 1), (2, 2), (1, 4)):
        model = inject("pill", tiny_llm(dtype=torch.float64))
        torch.manual_seed(1)
        for p in pill.adapter_parameters(model).values():
            torch.nn.init.normal_(p, std=0.1)
        examples, lookup = mc_examples(8)
        examples[1].messages[1]["content"] += " Surely."  # rows with more answer tokens weigh more
        cfg = TrainConfig(stage=2, output_dir=str(tmp_path / f"{batch_size}"), lr=1e-2, max_steps=1,
                          batch_size=batch_size, grad_accum=accum, progress=False)
        trainer = Trainer(model, formatter_for(model), examples, cfg, features=lookup)
        captured = {}
        trainer.optimizer.step = lambda: captured.update({n: p.grad.clone() for n, p in trainer.params.items()})
        trainer.train_step()
        grads.append(captured)
    assert len(grads[0]) > 10
    for other in grads[1:]:
        for name in grads[0]:
            torch.testing.assert_close(grads[0][name], other[name], rtol=1e-5, atol=1e-7, msg=name)


def test_cosine_schedule_warms_up_then_decays_to_min():
    values = [cosine_lr(s, 10, 2, 1.0, 0.1) for s in range(10)]
    assert values[0] == pytest.approx(0.5) and values[1] == pytest.approx(1.0)
    assert values[2] == pytest.approx(1.0) and all(a >= b for a, b in zip(values[2:], values[3:]))
    assert cosine_lr(10, 10, 2, 1.0, 0.1) == pytest.approx(0.1)


class Crash(RuntimeError):
    pass


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("method", ["pill", "lavin", "llama_adapter_v2"])
def test_killed_run_resumes_to_the_same_parameters(method, packing, tmp_path):
    """Stop after 3 of 7 steps (checkpoints every 2), resume from step 2: the final adapter, optimiser moments
    and step must equal an uninterrupted run's. LaVIN's dropout checks that the RNG state is restored."""
    examples, lookup = mc_examples(12, with_images=True)
    for i, example in enumerate(examples):  # lengths that differ, so that packing has rows to fill
        example.messages[0]["content"] += " Look." * (i % 4)
    stage = 2 if method != "lavin" else 1

    def run(output_dir, crash_at=None, resume=False):
        model = inject(method, tiny_llm())
        def on_step(step, metrics):
            if step == crash_at:
                raise Crash
        # V2's biases at another learning rate: the resumed optimiser must keep its groups apart.
        lr_scale = {"bias": 3.0} if method == "llama_adapter_v2" else {}
        cfg = TrainConfig(stage=stage, output_dir=str(output_dir), lr=3e-3, max_steps=7, batch_size=3,
                          grad_accum=2, save_every=2, warmup_steps=2, progress=False, packing=packing,
                          lr_scale=lr_scale)
        trainer = Trainer(model, formatter_for(model, max_length=200), examples, cfg, features=lookup,
                          on_step=on_step)
        trainer.train(resume=resume)
        return model, trainer

    torch.manual_seed(123)
    full, full_trainer = run(tmp_path / "full")
    torch.manual_seed(999)  # the resumed run must not depend on the RNG it starts with
    with pytest.raises(Crash):
        run(tmp_path / "resumed", crash_at=3)
    assert [p.name for p in checkpoints(tmp_path / "resumed")] == ["checkpoint-0000002"]
    assert not [p for p in os.listdir(tmp_path / "resumed") if p.startswith(".")]
    resumed, resumed_trainer = run(tmp_path / "resumed", resume=True)
    assert resumed_trainer.step == full_trainer.step == 7
    want = pill.adapter_parameters(full)
    got = pill.adapter_parameters(resumed)
    for name in want:
        assert torch.equal(want[name], got[name]), name
    for p_full, p_res in zip(full_trainer.params.values(), resumed_trainer.params.values()):
        s_full, s_res = full_trainer.optimizer.state[p_full], resumed_trainer.optimizer.state[p_res]
        assert torch.equal(s_full["exp_avg_sq"], s_res["exp_avg_sq"]) and torch.equal(s_full["step"], s_res["step"])
    steps = [json.loads(line)["step"] for line in open(tmp_path / "resumed" / "metrics.jsonl")]
    assert steps == list(range(1, 8))  # the steps after the checkpoint were logged once, by the resumed run
    saved = pill.read_adapter_config(tmp_path / "resumed" / "adapter")
    assert saved["pill_type"] == method and saved["stage"] == stage


@pytest.mark.parametrize("method", ["pill", "lavin", "llama_adapter_v2"])
def test_gradient_checkpointing_trains_to_the_same_parameters_recomputing_every_layer(method, tmp_path):
    """train.gradient_checkpointing: three steps end at the parameters of the same run without it (float64; LaVIN's
    dropout draws the same masks in the recomputation), and every decoder layer runs twice per micro-batch."""
    examples, lookup = mc_examples(6, with_images=True)
    stage = 2 if method != "lavin" else 1

    def run(checkpointing):
        torch.manual_seed(7)
        model = inject(method, tiny_llm(dtype=torch.float64))
        calls = []
        for layer in model.model.layers:  # the recomputation re-runs the layer's forward, not its __call__
            layer.self_attn.q_proj.register_forward_pre_hook(lambda module, args: calls.append(module))
        cfg = TrainConfig(stage=stage, output_dir=str(tmp_path / str(checkpointing)), lr=1e-2, max_steps=3,
                          batch_size=3, warmup_steps=1, progress=False, gradient_checkpointing=checkpointing)
        trainer = Trainer(model, formatter_for(model), examples, cfg, features=lookup)
        for _ in range(cfg.max_steps):
            trainer.train_step()
        return pill.adapter_parameters(model), len(calls)

    plain, plain_calls = run(False)
    checkpointed, checkpointed_calls = run(True)
    assert checkpointed_calls == 2 * plain_calls > 0, (plain_calls, checkpointed_calls)
    for name, want in plain.items():
        torch.testing.assert_close(checkpointed[name], want, rtol=1e-10, atol=1e-12, msg=name)


def test_gradient_checkpointing_is_a_boolean_train_key():
    assert TrainConfig.from_dict({"gradient_checkpointing": True}).gradient_checkpointing is True
    with pytest.raises(ValueError, match="train.gradient_checkpointing must be true or false, got 'yes'"):
        TrainConfig.from_dict({"gradient_checkpointing": "yes"})


@pytest.mark.parametrize("damage", ["state json", "optimiser tensors"])
def test_resuming_from_a_damaged_checkpoint_names_the_file(tmp_path, damage):
    examples, lookup = mc_examples(6)
    model = inject("pill", tiny_llm())
    cfg = TrainConfig(stage=2, output_dir=str(tmp_path), lr=1e-3, max_steps=2, batch_size=3, save_every=2,
                      progress=False)
    Trainer(model, formatter_for(model), examples, cfg, features=lookup).train()
    checkpoint = latest_checkpoint(tmp_path)
    name = "trainer_state.json" if damage == "state json" else "trainer_state.safetensors"
    data = (checkpoint / name).read_bytes()
    (checkpoint / name).write_bytes(data[:len(data) // 3])
    model = inject("pill", tiny_llm())
    trainer = Trainer(model, formatter_for(model), examples, dataclasses.replace(cfg, max_steps=3), features=lookup)
    with pytest.raises(ValueError, match=f"{name}: not (valid JSON|a readable safetensors file)"):
        trainer.train(resume=True)


def test_a_corrupt_image_file_is_an_error_naming_it(tmp_path):
    from pill.vision import load_image

    good = tmp_path / "good.png"
    from PIL import Image

    Image.fromarray((torch.rand(64, 64, 3) * 255).byte().numpy()).save(good)
    (tmp_path / "truncated.png").write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"truncated\.png: the image file is truncated or corrupt"):
        load_image(tmp_path / "truncated.png")
    with pytest.raises(ValueError, match=r"text\.png: not an image file"):
        load_image(tmp_path / "text.png")
    assert load_image(good).size == (64, 64)


def test_a_run_refuses_to_overwrite_checkpoints_without_resume(tmp_path):
    model = inject("pill", tiny_llm())
    examples, lookup = mc_examples(4)
    cfg = TrainConfig(output_dir=str(tmp_path), max_steps=1, batch_size=2, progress=False)
    Trainer(model, formatter_for(model), examples, cfg, features=lookup).train()
    assert latest_checkpoint(tmp_path) is not None
    with pytest.raises(FileExistsError, match="resume"):
        Trainer(model, formatter_for(model), examples, cfg, features=lookup).train()


def test_resume_refuses_a_checkpoint_of_other_data(tmp_path):
    model = inject("pill", tiny_llm())
    examples, lookup = mc_examples(6)
    cfg = TrainConfig(output_dir=str(tmp_path), max_steps=1, batch_size=2, progress=False)
    Trainer(model, formatter_for(model), examples, cfg, features=lookup).train()
    cfg2 = TrainConfig(output_dir=str(tmp_path), max_steps=3, batch_size=2, progress=False)
    with pytest.raises(ValueError, match="6 examples"):
        Trainer(model, formatter_for(model), examples[:4], cfg2, features=lookup).train(resume=True)


def test_training_moves_the_loss_and_the_evaluation_reports_categories(tmp_path):
    model = inject("pill", tiny_llm())
    examples, lookup = mc_examples(16)
    fmt = formatter_for(model)
    before = evaluate_multiple_choice(model, fmt, examples[:6], lookup, max_new_tokens=20)
    cfg = TrainConfig(stage=2, output_dir=str(tmp_path), lr=2e-2, max_steps=80, batch_size=8, progress=False)
    trainer = Trainer(model, fmt, examples, cfg, features=lookup)
    losses = []
    trainer.on_step = lambda step, m: losses.append(m["loss"])
    trainer.train()
    assert losses[-1] < 0.5 * losses[0]
    after = evaluate_multiple_choice(model, fmt, examples[:6], lookup, max_new_tokens=20)
    assert not any(p["output"].startswith("The answer is") for p in before["predictions"])
    assert all(p["output"].startswith("The answer is") for p in after["predictions"])
    assert set(after["categories"]["parity"]) <= {"even", "odd"}
    assert sum(c["total"] for c in after["categories"]["parity"].values()) == 6
    assert after["unparseable_rate"] == sum(p["prediction"] is None for p in after["predictions"]) / 6


@pytest.mark.parametrize("method", ["pill", "lavin", "llama_adapter_v2"])
def test_greedy_generation_follows_the_teacher_forced_argmax(method):
    """Generation (prompt only, left-padded batch, KV cache) against the training forward on the full text."""
    from conftest import randomize_adapters
    from pill.evaluate import generate_answers

    model = randomize_adapters(inject(method, tiny_llm()), std=0.3)
    pill.set_stage(model, model.multimodal.config.stages[-1])
    model.eval()
    examples, lookup = mc_examples(3)
    examples[0].messages[0]["content"] += " Think."  # rows of different lengths
    fmt = formatter_for(model)
    texts = generate_answers(model, fmt, examples, lookup, max_new_tokens=1)
    collator = Collator(0, lookup, per_sequence_images=method == "llama_adapter_v2")
    batch = collator([fmt.encode(e) for e in examples], examples)
    labels = batch.pop("labels")
    with torch.no_grad():
        argmax = model(**batch).logits.argmax(-1)
    for row, text in enumerate(texts):
        first = int((labels[row] != IGNORE).nonzero()[0])
        expected = fmt.tokenizer.decode([int(argmax[row, first - 1])], skip_special_tokens=True)
        assert text == expected


@pytest.mark.parametrize("method", ["pill", "pill_query_head", "lavin", "llama_adapter_v2"])
def test_evaluator_answers_equal_the_greedy_full_recompute_loop(method):
    """generate_answers (left-padded batch, KV cache, stops at the end token) against the uncached loop."""
    from conftest import randomize_adapters
    from generation_oracles import greedy_answers
    from pill.evaluate import generate_answers

    if method == "pill_query_head":
        model = pill.inject_pill(tiny_llm(), pill.PillConfig(adapter_dim=4, gate_per="query_head"), vision_dim=DIM,
                                 image_token_id=IMAGE_ID)
    else:
        model = inject(method, tiny_llm())
    model = randomize_adapters(model, std=0.3)
    pill.set_stage(model, model.multimodal.config.stages[-1])
    model.eval()
    examples, lookup = mc_examples(4)
    examples[0].messages[0]["content"] += " Think."  # rows of different lengths
    fmt = formatter_for(model)
    got = generate_answers(model, fmt, examples, lookup, max_new_tokens=10, batch_size=3)
    expected = greedy_answers(model, fmt, examples[:3], lookup, 10) + greedy_answers(model, fmt, examples[3:],
                                                                                     lookup, 10)
    assert got == expected
    assert len(set(got)) > 1  # the answers depend on the image and question


def test_parse_answer():
    assert parse_answer("The answer is C.", 4) == 2
    assert parse_answer("The answer is (B) two.", 4) == 1
    assert parse_answer("The answer is E.", 4) is None  # outside the options
    assert parse_answer("I think it's a seven", 4) is None
    assert parse_answer("The answer is Alpha", 4) is None
    choices = ["seven", "two", "one", "nine"]
    assert parse_answer("The answer is two.", choices) == 1  # the option's text instead of its letter
    assert parse_answer("The answer is D. It is nine", choices) == 3
    assert parse_answer("The answer is eleven.", choices) is None


# -- bad input ---------------------------------------------------------------------------------------------------

def _png(path, value=128):
    from PIL import Image

    Image.new("RGB", (16, 16), (value, 255 - value, 30)).save(path)
    return path


def _line(image="a.png", question="<image>\nWhat?", answer="A cat."):
    record = {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    if image is not None:
        record["image"] = image
    return json.dumps(record)


def test_conversations_load_with_relative_image_paths(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "d.jsonl").write_text(_line() + "\n\n" + _line(image=None, question="Hi") + "\n")
    examples = load_conversations(tmp_path / "d.jsonl")
    assert len(examples) == 2 and examples[0].images == [tmp_path / "a.png"] and not examples[1].images
    assert examples[0].messages[0]["role"] == "user" and examples[0].messages[1]["role"] == "assistant"


@pytest.mark.parametrize("bad, message", [
    ("{not json", r"d\.jsonl:2: malformed JSON"),
    (_line(image="missing.png"), r"d\.jsonl:2: image file not found: .*missing\.png"),
    (_line(question="What?"), r"d\.jsonl:2: 1 image\(s\) but 0 <image> placeholder"),
    (_line(question="<image><image> What?"), r"d\.jsonl:2: 1 image\(s\) but 2 <image>"),
    (json.dumps({"conversations": [{"from": "robot", "value": "x"}]}), r"d\.jsonl:2: bad turn"),
])
def test_bad_conversation_lines_name_the_file_and_line(tmp_path, bad, message):
    _png(tmp_path / "a.png")
    (tmp_path / "d.jsonl").write_text(_line() + "\n" + bad + "\n")
    with pytest.raises(DataError, match=message):
        load_conversations(tmp_path / "d.jsonl")


def test_scienceqa_layout_and_categories(tmp_path):
    problems = {
        "1": {"question": "Which is a mammal?", "choices": ["cat", "fish"], "answer": 0, "hint": "",
              "image": "image.png", "subject": "natural science", "grade": "grade3", "split": "train"},
        "2": {"question": "Capital?", "choices": ["x", "y", "z"], "answer": 2, "hint": "Some context.",
              "image": None, "subject": "social science", "grade": "grade8", "split": "train"},
    }
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"train": ["1", "2"], "test": []}))
    (tmp_path / "images" / "train" / "1").mkdir(parents=True)
    _png(tmp_path / "images" / "train" / "1" / "image.png")
    examples = load_scienceqa(tmp_path, "train")
    assert examples[0].category == {"subject": "NAT", "context": "IMG", "grade": "G1-6"}
    assert examples[1].category == {"subject": "SOC", "context": "TXT", "grade": "G7-12"}
    assert examples[0].messages[0]["content"].startswith("<image>\nQuestion: Which is a mammal?\nOptions: (A) cat")
    assert examples[1].messages[1]["content"] == "The answer is C."
    os.remove(tmp_path / "images" / "train" / "1" / "image.png")
    with pytest.raises(DataError, match=r"problem 1: image file not found"):
        load_scienceqa(tmp_path, "train")
    with pytest.raises(DataError, match="split 'val'"):
        load_scienceqa(tmp_path, "val")


def test_too_long_examples_fail_naming_the_item():
    fmt = PromptFormatter(char_tokenizer(), image_token_id=IMAGE_ID, image_tokens=2, max_length=20)
    examples, _ = mc_examples(1)
    with pytest.raises(DataError, match="item 0: .* max_length 20"):
        fmt.encode(examples[0])


def test_lr_scale_multiplies_the_step_of_the_parameters_it_names(tmp_path):
    """Adam's first step moves every element by lr * sign(gradient) (m / sqrt(v) = g / |g|), less the decoupled
    weight decay on matrices: a gate named in lr_scale moves factor times as far, everything else by lr."""
    model = inject("llama_adapter_v2", tiny_llm(dtype=torch.float64))
    examples, lookup = mc_examples(4, with_images=True)
    lr, factor = 1e-3, 7.0
    cfg = TrainConfig(stage=1, output_dir=str(tmp_path), lr=lr, max_steps=1, batch_size=4, warmup_steps=0,
                      weight_decay=0.0, progress=False, lr_scale={"pill_prompt_gate": factor})
    trainer = Trainer(model, formatter_for(model), examples, cfg, features=lookup)
    # Zero gates give the prompts no gradient; opened gates let every trained tensor receive one.
    with torch.no_grad():
        for name, p in trainer.params.items():
            if name.endswith("pill_prompt_gate"):
                p.fill_(0.5)
    before = {n: p.detach().clone() for n, p in trainer.params.items()}
    grads = {}
    step = trainer.optimizer.step
    trainer.optimizer.step = lambda: (grads.update({n: p.grad.clone() for n, p in trainer.params.items()}), step())
    trainer.train_step()
    gates = [n for n in before if n.endswith("pill_prompt_gate")]
    assert gates and len(gates) < len(before)
    for name, p in trainer.params.items():
        # Elements whose gradient is far above Adam's eps (1e-8); e.g. attention key biases get none.
        moved = (p.detach() - before[name]).abs()[grads[name].abs() > 1e-5]
        assert moved.numel() > 0, name
        want = lr * (factor if name in gates else 1.0)
        torch.testing.assert_close(moved, torch.full_like(moved, want), rtol=1e-3, atol=0, msg=name)


@pytest.mark.parametrize("lr_scale, message", [({"no_such_part": 2.0}, r"\['no_such_part'\] name\(s\) no parameter"),
                                                ({"pill_prompt_gate": 0}, "positive factors")])
def test_lr_scale_refuses_names_that_match_nothing_and_bad_factors(tmp_path, lr_scale, message):
    model = inject("llama_adapter_v2", tiny_llm())
    examples, lookup = mc_examples(2, with_images=True)
    with pytest.raises(ValueError, match=message):
        cfg = TrainConfig(stage=1, output_dir=str(tmp_path), lr=1e-3, max_steps=1, progress=False, lr_scale=lr_scale)
        Trainer(model, formatter_for(model), examples, cfg, features=lookup)


def test_train_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['lerning_rate'\]"):
        TrainConfig.from_dict({"lerning_rate": 1e-3})


def test_hf_vision_tower_features_and_the_feature_cache(tmp_path):
    """A local CLIP vision tower (safetensors) as the encoder: features of one hidden layer, CLS dropped; the cache
    serves a second encoder instance from disk without encoding again."""
    import numpy as np
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from pill.vision import FeatureCache, HFVisionEncoder, build_encoder

    config = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=16)
    CLIPVisionModel(config).save_pretrained(tmp_path / "clip", safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "clip")
    encoder = build_encoder({"type": "hf", "path": str(tmp_path / "clip"), "feature_layer": -2, "drop_cls": True})
    assert encoder.feature_dim == 16 and encoder.num_tokens == 4  # (32/16)^2 patches, CLS dropped
    images = [np.random.rand(40, 30, 3).astype(np.float32) for _ in range(3)]
    direct = encoder.encode(images)
    assert direct.shape == (3, 4, 16)
    # The hidden state the config names, read off the tower directly; the last layer's is another one.
    clip = CLIPVisionModel.from_pretrained(tmp_path / "clip").eval()
    pixels = CLIPImageProcessor.from_pretrained(tmp_path / "clip")(
        images=[(im * 255).round().astype(np.uint8) for im in images], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hidden = clip(pixel_values=pixels, output_hidden_states=True).hidden_states
    torch.testing.assert_close(direct, hidden[-2][:, 1:])
    last = HFVisionEncoder(tmp_path / "clip", feature_layer=-1, drop_cls=True).encode(images)
    torch.testing.assert_close(last, hidden[-1][:, 1:])
    assert (last - direct).abs().max() > 1e-3
    with_cls = HFVisionEncoder(tmp_path / "clip", feature_layer=-2).encode(images)
    torch.testing.assert_close(with_cls, hidden[-2])
    calls = []

    def load(i):
        calls.append(i)
        return images[i]

    cache = FeatureCache(encoder, tmp_path / "cache")
    got = cache.features(["a", "b", "c"], load)
    torch.testing.assert_close(got, direct)
    assert calls == [0, 1, 2]
    again = FeatureCache(HFVisionEncoder(tmp_path / "clip", feature_layer=-2, drop_cls=True), tmp_path / "cache")
    torch.testing.assert_close(again.features(["c", "a"], lambda i: pytest.fail("encoded again")), direct[[2, 0]])
    other = FeatureCache(HFVisionEncoder(tmp_path / "clip", feature_layer=-1), tmp_path / "cache")
    assert other.encoder.key != encoder.key  # another layer is another cache
    with pytest.raises(ValueError, match=r"vision: unknown key\(s\) \['layer'\]"):
        build_encoder({"type": "hf", "path": str(tmp_path / "clip"), "layer": 1})
