"""Training stages (trainable sets per method), adapter checkpoints, and bad model-level input."""
import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

import pill
from conftest import IMAGE_TOKEN, VISION_DIM, make_llama, multimodal_batch, randomize_adapters
from test_models import batch_for, inject, make_model


def names(params):
    return set(params)


def test_pill_stage_parameter_groups_match_the_seed():
    model = make_model("pill", randomize=False)
    hidden, r, layers, kv_heads = 40, 5, 3, 2
    glu = 3 * hidden * r
    stage1 = pill.stage_parameters(model, 1)
    assert all(n.startswith("multimodal.projector.") or ".experts.visual." in n for n in stage1)
    assert sum(p.numel() for p in stage1.values()) == VISION_DIM * hidden + layers * glu
    stage2 = pill.stage_parameters(model, 2)
    assert sum(p.numel() for p in stage2.values()) == VISION_DIM * hidden + layers * (3 * glu + hidden * kv_heads)
    pill.set_stage(model, 1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == names(stage1)
    assert all(layer.pill_stage == 1 for layer in model.model.layers)
    report = pill.trainable_parameter_report(model)
    assert "stage 1:" in report and "stage 2:" in report and "pill_ffn_experts.visual" in report


def test_pill_stage1_last_layer_sends_text_to_the_visual_expert():
    model = make_model("pill")
    pill.set_stage(model, 1)
    ids = torch.randint(3, 96, (2, 7))  # text only: only the inverted last layer can reach a visual expert
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    last = model.model.layers[-1].pill_ffn_experts.experts["visual"].w_up.grad
    first = model.model.layers[0].pill_ffn_experts.experts["visual"].w_up.grad
    assert last is not None and last.abs().max() > 0
    assert first is None or first.abs().max() == 0
    assert model.model.layers[-1].pill_ffn_experts.experts["text"].w_up.grad is None  # frozen in stage 1


def test_pill_stage1_invert_can_be_turned_off():
    model = pill.inject_pill(make_llama(), pill.PillConfig(adapter_dim=4, stage1_invert_last_layer=False),
                             vision_dim=VISION_DIM, image_token_id=IMAGE_TOKEN)
    pill.set_stage(model, 1)
    assert model.model.layers[-1].pill_expert_ids(torch.tensor([[True, False]])).tolist() == [[1, 0]]


def test_llama_adapter_v2_stages_are_disjoint_and_lavin_has_one_stage():
    model = make_model("llama_adapter_v2", randomize=False)
    s1, s2 = pill.stage_parameters(model, 1), pill.stage_parameters(model, 2)
    assert s1 and s2 and not (set(s1) & set(s2))
    assert any("pill_prompt_gate" in n for n in s1) and any(n.startswith("multimodal.projector") for n in s1)
    assert all("norm.weight" in n or n.endswith(".bias") for n in s2)
    assert "model.norm.weight" in s2 and "model.layers.0.self_attn.q_proj.bias" in s2
    assert not any("k_proj" in n or "v_proj" in n for n in s2)  # the seed tunes no k/v biases
    # Prompts in the last L layers only: all but the first by default.
    assert [layer.pill_has_prompt for layer in model.model.layers] == [False, True, True]
    lavin = make_model("lavin", randomize=False)
    with pytest.raises(ValueError, match=r"lavin has stages \(1,\)"):
        pill.set_stage(lavin, 2)


def test_llama_adapter_v2_1_lora_and_new_gate_train_in_stage_2_and_start_as_the_base():
    """V2.1: the LoRA pairs of all seven projections and the prompted layers' new_gate are stage-2 parameters
    (with the biases and norms); at initialisation (B = 0, new_gate = 1) the model equals V2 without them."""
    config = pill.LlamaAdapterV2Config(prompt_len=4, visual_blocks=1, visual_heads=4, lora_rank=3, new_gate=True)
    torch.manual_seed(0)
    model = pill.inject_llama_adapter_v2(make_llama(torch.float64), config, vision_dim=VISION_DIM).double()
    s1, s2 = pill.stage_parameters(model, 1), pill.stage_parameters(model, 2)
    lora = {n for n in s2 if ".pill_lora." in n}
    assert len(lora) == 3 * 7 * 2 and not any(".pill_lora." in n or "new_gate" in n for n in s1)
    assert {n for n in s2 if "pill_new_gate" in n} == {f"model.layers.{i}.pill_new_gate" for i in (1, 2)}
    plain_config = pill.LlamaAdapterV2Config(prompt_len=4, visual_blocks=1, visual_heads=4)
    torch.manual_seed(0)
    plain = pill.inject_llama_adapter_v2(make_llama(torch.float64), plain_config, vision_dim=VISION_DIM).double()
    plain.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():  # the prompt branch on, so that new_gate = 1 is exercised
        for layer in [*model.model.layers, *plain.model.layers]:
            if layer.pill_has_prompt:
                layer.pill_prompt_gate.fill_(0.7)
    ids, features, extra = batch_for("llama_adapter_v2")
    with torch.no_grad():
        got = model(input_ids=ids, image_features=features, **extra).logits
        expected = plain(input_ids=ids, image_features=features, **extra).logits
    assert torch.allclose(got, expected, rtol=0, atol=1e-12)
    with torch.no_grad():
        model.model.layers[2].pill_lora.up_proj.lora_b.normal_()
        assert not torch.allclose(model(input_ids=ids, image_features=features, **extra).logits, expected)


@pytest.mark.parametrize("method", ["pill", "lavin", "llama_adapter_v2"])
def test_save_load_round_trip_is_exact_and_holds_only_adapter_weights(method, tmp_path):
    model = make_model(method)
    pill.set_stage(model, 1)
    ids, features, extra = batch_for(method)
    expected = model(input_ids=ids, image_features=features, **extra).logits
    path = pill.save_adapter(model, tmp_path / "adapter")
    assert sorted(os.listdir(path)) == ["adapter_config.json", "adapter_model.safetensors"]
    tensors = load_file(path / "adapter_model.safetensors")
    assert set(tensors) == set(pill.adapter_parameters(model))
    assert not any("embed_tokens" in n or "lm_head" in n or "q_proj.weight" in n for n in tensors)
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["pill_type"] == model.multimodal.method and config["stage"] == 1

    # A fresh base model with the same weights, the method injected with other random adapters.
    fresh = make_model(method)
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if k not in tensors}, strict=False)
    assert (fresh(input_ids=ids, image_features=features, **extra).logits - expected).abs().max() > 1e-6
    pill.load_adapter(fresh, path)
    assert fresh.multimodal.stage == 1
    assert torch.equal(fresh(input_ids=ids, image_features=features, **extra).logits, expected)
    for name, p in pill.adapter_parameters(fresh).items():
        assert torch.equal(p, tensors[name].to(p.dtype)), name

    # load_pretrained_adapter re-creates the method on a plain LLaMA.
    plain = make_llama()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k not in tensors and
                           not k.endswith(".bias")}, strict=False)
    recreated = pill.load_pretrained_adapter(plain, path)  # fresh adapters are fp32: the fp64 values round
    assert recreated.multimodal.stage == 1
    torch.testing.assert_close(recreated(input_ids=ids, image_features=features, **extra).logits, expected,
                               rtol=1e-5, atol=1e-5)


def test_load_refuses_mismatched_configs_naming_them(tmp_path):
    model = make_model("pill")
    path = pill.save_adapter(model, tmp_path / "a")
    other = pill.inject_pill(make_llama(), pill.PillConfig(adapter_dim=7), vision_dim=VISION_DIM,
                             image_token_id=IMAGE_TOKEN)
    with pytest.raises(ValueError, match=r"config\.adapter_dim: checkpoint has 5, model has 7"):
        pill.load_adapter(other, path)
    wider = pill.inject_pill(make_llama(hidden=48), pill.PillConfig(adapter_dim=5), vision_dim=VISION_DIM,
                             image_token_id=IMAGE_TOKEN)
    with pytest.raises(ValueError, match=r"base_model\.hidden_size: checkpoint has 40, model has 48"):
        pill.load_adapter(wider, path)
    lavin = make_model("lavin")
    with pytest.raises(ValueError, match="method: checkpoint is 'pill', model has 'lavin'"):
        pill.load_adapter(lavin, path)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        pill.load_adapter(model, tmp_path / "nowhere")


def test_load_refuses_tampered_tensors(tmp_path):
    from safetensors.torch import save_file

    model = make_model("pill")
    path = pill.save_adapter(model, tmp_path / "a")
    tensors = load_file(path / "adapter_model.safetensors")
    name = sorted(tensors)[0]
    tensors[name] = tensors[name][:1]
    tensors["model.layers.0.stranger"] = torch.zeros(1)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="unexpected.*stranger.*shape mismatches"):
        pill.load_adapter(model, path)


def test_save_is_atomic_a_failed_write_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    model = make_model("pill")
    path = pill.save_adapter(model, tmp_path / "a")
    before = (path / "adapter_model.safetensors").read_bytes()
    randomize_adapters(model)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("pill.checkpoint.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        pill.save_adapter(model, path)
    assert (path / "adapter_model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["a"]  # no staging directory left behind
    monkeypatch.undo()
    pill.save_adapter(model, path)  # overwriting an existing checkpoint works
    assert (path / "adapter_model.safetensors").read_bytes() != before
    assert sorted(os.listdir(tmp_path)) == ["a"]


CRASHING_SAVE = """
import os, sys
sys.path.insert(0, {tests!r})
import torch
import pill, pill.checkpoint as checkpoint
from conftest import randomize_adapters
from test_models import make_model
model = make_model("pill")
pill.load_adapter(model, {path!r})
randomize_adapters(model)
real_save_file = checkpoint.save_file
def crash(*args, **kwargs):
    os._exit(9)  # the process dies here: no exception handler, no clean-up
def crash_midway(tensors, filename, metadata=None):
    real_save_file(tensors, filename, metadata=metadata)
    with open(filename, "r+b") as f:
        f.truncate(os.path.getsize(filename) // 2)
    crash()
if {where!r} == "writing the tensors":
    checkpoint.save_file = crash_midway
else:
    checkpoint.replace_directory = crash
pill.save_adapter(model, {path!r})
"""


@pytest.mark.parametrize("where", ["writing the tensors", "before the rename"])
def test_a_crash_while_saving_leaves_the_previous_adapter_whole(tmp_path, where):
    import subprocess
    import sys

    model = make_model("pill")
    path = pill.save_adapter(model, tmp_path / "a")
    before = {k: v.clone() for k, v in pill.adapter_parameters(model).items()}
    script = CRASHING_SAVE.format(tests=os.path.dirname(__file__), path=str(path), where=where)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 9, run.stderr
    # Only the previous adapter is visible; the dead writer's staging directory is hidden and never loaded.
    assert [p for p in os.listdir(tmp_path) if not p.startswith(".")] == ["a"]
    assert all(p.startswith(".a.tmp-") for p in os.listdir(tmp_path) if p.startswith("."))
    fresh = make_model("pill")
    pill.load_adapter(fresh, path)
    for name, p in pill.adapter_parameters(fresh).items():
        assert torch.equal(p, before[name]), name


CRASHING_SWAP = """
import json, os, shutil, sys, traceback
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)  # no worker threads: the writers below are forked from this process
from safetensors.torch import save_file
import pill, pill.checkpoint as checkpoint
from conftest import randomize_adapters
from test_models import make_model

old, root = {old!r}, {root!r}
model = make_model("pill")
pill.load_adapter(model, old)
randomize_adapters(model)  # the new adapter, written for the test by safetensors itself
save_file({{n: p.detach().clone() for n, p in pill.adapter_parameters(model).items()}},
          os.path.join(root, "new.safetensors"))

# Crash points: just before each audit event that changes the file system, and before each ctypes event: a foreign
# call (renameat2) raises no audit event on Python 3.11, so the ctypes events around it are the nearest points.
WRITES = {{"os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.truncate", "os.link", "os.symlink",
           "shutil.rmtree", "shutil.copyfile", "shutil.copytree"}}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def is_crash_point(event, args):
    if event == "open":
        return bool(args[2] & WRITE_FLAGS)
    return event in WRITES or event.startswith("ctypes.")


watch = {{"on": False, "seen": [], "crash_at": 0}}


def die_at_the_chosen_point(event, args):
    if watch["on"] and is_crash_point(event, args):
        watch["seen"].append(event)
        if len(watch["seen"]) == watch["crash_at"]:
            os._exit(9)  # the process dies here: no exception handler, no clean-up


sys.addaudithook(die_at_the_chosen_point)
real_replace_directory = checkpoint.replace_directory


def watched_replace_directory(staging, target):
    watch["on"] = True
    try:
        real_replace_directory(staging, target)
    finally:
        watch["on"] = False


checkpoint.replace_directory = watched_replace_directory

# A first save over a copy of the old adapter, in this process, counts the crash points.
shutil.copytree(old, os.path.join(root, "counting", "adapter"))
pill.save_adapter(model, os.path.join(root, "counting", "adapter"))
events = watch["seen"]

crashes = []
for k in range(1, len(events) + 1):
    where = os.path.join(root, f"crash-{{k}}")
    shutil.copytree(old, os.path.join(where, "adapter"))
    pid = os.fork()
    if pid == 0:  # the writer: saves over the old adapter and dies before its k-th crash point
        watch["seen"], watch["crash_at"] = [], k
        try:
            pill.save_adapter(model, os.path.join(where, "adapter"))
            code = 0
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
    exit_code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    crashes.append({{"crash_at": k, "event": events[k - 1], "exit": exit_code}})
with open(os.path.join(root, "crashes.json"), "w") as f:
    json.dump({{"events": events, "crashes": crashes}}, f)
"""


def directories_can_be_exchanged(where):
    """Whether the file system at `where` swaps two directories in one step (renameat2 RENAME_EXCHANGE), asked of
    the kernel directly."""
    import ctypes

    a, b = where / "exchange-probe-a", where / "exchange-probe-b"
    a.mkdir()
    b.mkdir()
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
        at_fdcwd, rename_exchange = -100, 2
        return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
    except (OSError, AttributeError):
        return False
    finally:
        a.rmdir()
        b.rmdir()


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="only Linux exchanges two directories in one step; elsewhere replace_directory moves the "
                           "old one aside first, a moment with no adapter by design")
def test_a_crash_anywhere_inside_the_swap_leaves_the_old_adapter_or_the_new_one_whole(tmp_path):
    """The writer dies (os._exit) inside replace_directory while an adapter exists, once before each of its file
    system changes in turn: every time, the visible adapter loads as exactly the old one or exactly the new one."""
    import subprocess

    if not directories_can_be_exchanged(tmp_path):
        pytest.skip("this file system cannot exchange two directories (RENAME_EXCHANGE): replace_directory moves "
                    "the old one aside first, a moment with no adapter by design")
    model = make_model("pill")
    old_path = pill.save_adapter(model, tmp_path / "old")
    old = {k: v.clone() for k, v in pill.adapter_parameters(model).items()}
    script = CRASHING_SWAP.format(tests=os.path.dirname(__file__), old=str(old_path), root=str(tmp_path))
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "crashes.json").read_text())
    events, new = report["events"], load_file(tmp_path / "new.safetensors")
    assert events, "replace_directory raised no audit event: there is no point inside it to crash at"
    fresh = make_model("pill")
    outcomes, problems = {}, []
    for crash in report["crashes"]:
        k = crash["crash_at"]
        point = f"died before crash point {k}/{len(events)} ({crash['event']})"
        if crash["exit"] != 9:
            problems.append(f"{point}: the writer exited with {crash['exit']} instead of dying there")
            continue
        where = tmp_path / f"crash-{k}"
        visible = sorted(p for p in os.listdir(where) if not p.startswith("."))
        if visible != ["adapter"]:
            problems.append(f"{point}: visible {visible}, expected ['adapter']")
            continue
        try:
            pill.load_adapter(fresh, where / "adapter")
        except (OSError, ValueError) as exc:
            problems.append(f"{point}: the adapter does not load: {exc}")
            continue
        loaded = pill.adapter_parameters(fresh)
        if all(torch.equal(p, old[n]) for n, p in loaded.items()):
            outcomes[k] = "old"
        elif all(torch.equal(p, new[n]) for n, p in loaded.items()):
            outcomes[k] = "new"
        else:
            problems.append(f"{point}: the adapter is neither the old one nor the new one")
    assert not problems, "\n".join(problems) + f"\ncrash points inside replace_directory: {events}"
    # The crash points straddle the swap, or the test would not be looking inside it.
    assert set(outcomes.values()) == {"old", "new"}, (outcomes, events)


def test_an_interrupted_save_cleans_up_and_keeps_the_previous_adapter(tmp_path, monkeypatch):
    """Failing midway through the tensor file (a half-written file, then an error) leaves the old adapter."""
    from safetensors.torch import save_file as real_save_file

    model = make_model("pill")
    path = pill.save_adapter(model, tmp_path / "a")
    before = (path / "adapter_model.safetensors").read_bytes()
    randomize_adapters(model)

    def fail_midway(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        raise KeyboardInterrupt

    monkeypatch.setattr("pill.checkpoint.save_file", fail_midway)
    with pytest.raises(KeyboardInterrupt):
        pill.save_adapter(model, path)
    assert (path / "adapter_model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["a"]
    pill.load_adapter(make_model("pill"), path)


def test_bad_model_level_inputs_raise_clear_errors():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(TypeError, match=r"expected a transformers LlamaForCausalLM \(LLaMA\), .*got GPT2LMHeadModel"):
        pill.inject_pill(gpt2, vision_dim=8, image_token_id=60)
    model = make_model("pill")
    with pytest.raises(ValueError, match="already has the 'pill' adapters injected"):
        pill.inject_lavin(model, vision_dim=8, image_token_id=60)
    with pytest.raises(ValueError, match="vision_dim must be the positive feature width"):
        pill.inject_pill(make_llama(), vision_dim=0, image_token_id=60)
    ids, features = multimodal_batch(2, 11, images=(True, True))
    with pytest.raises(ValueError, match="6 image placeholder tokens but image_features carry 1 images x 3 tokens"):
        model(input_ids=ids, image_features=features[:1])
    with pytest.raises(ValueError, match="but no image_features were given"):
        model(input_ids=ids)
    with pytest.raises(ValueError, match=r"image_features must have shape \[N_images, tokens, C=24\]"):
        model(input_ids=ids, image_features=features[..., :-1])
    with pytest.raises(ValueError, match=r"mm_token_type_ids must have shape \[batch, seq\] = \(2, 11\)"):
        model(input_ids=ids, image_features=features, mm_token_type_ids=torch.zeros(2, 10, dtype=torch.long))
    with pytest.raises(ValueError, match=r"attention_mask must have shape \[batch, cached \+ new tokens\] = \(2, 11\)"):
        model(input_ids=ids, image_features=features, attention_mask=torch.ones(2, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="PillConfig.gate_per must be"):
        pill.PillConfig(gate_per="token")
    with pytest.raises(ValueError, match="LavinConfig.adapter_dim .* multiple of groups"):
        pill.LavinConfig(adapter_dim=7, groups=2)
    with pytest.raises(ValueError, match="unknown keys"):
        pill.PillConfig.from_dict({"adapter_dim": 4, "rank": 3})
    with pytest.raises(ValueError, match="prompt_layers .* exceeds"):
        pill.inject_llama_adapter_v2(make_llama(), pill.LlamaAdapterV2Config(prompt_layers=9, visual_blocks=0,
                                                                             visual_heads=4), vision_dim=8)


@pytest.mark.parametrize("method", ["pill", "lavin", "llama_adapter_v2"])
def test_a_training_step_in_bf16_with_fp32_adapters(method):
    """The seed's precision recipe: bf16 base, fp32 adapters; gradients land in fp32 master weights."""
    model = inject(method, make_llama(torch.bfloat16))
    pill.set_stage(model, 1)
    ids, features, extra = batch_for(method)
    features = features.to(torch.bfloat16)
    loss = model(input_ids=ids, image_features=features, labels=ids, **extra).loss
    loss.backward()
    grads = [p.grad for p in model.trainable_parameters()]
    assert torch.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in model.trainable_parameters())
    assert sum(g is not None and g.abs().max() > 0 for g in grads) > 0


def test_frozen_vision_encoder_callable_feeds_the_projector():
    """Any callable images -> [N, tokens, C] works as the vision side; it is frozen and not saved."""
    encoder = torch.nn.Sequential(torch.nn.Conv2d(1, VISION_DIM, 4, stride=4), torch.nn.Flatten(2)).double()
    tower = lambda images: encoder(images).transpose(1, 2)  # noqa: E731  [N, 4 tokens, C]
    model = pill.inject_pill(make_llama(), pill.PillConfig(adapter_dim=4), vision_dim=VISION_DIM,
                             image_token_id=IMAGE_TOKEN, vision_encoder=tower).double()
    randomize_adapters(model)
    images = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    ids = torch.randint(3, 96, (1, 9))
    ids[0, 1:5] = IMAGE_TOKEN
    via_images = model(input_ids=ids, images=images, labels=ids)
    via_features = model(input_ids=ids, image_features=tower(images))
    torch.testing.assert_close(via_images.logits, via_features.logits)
    via_images.loss.backward()
    assert all(p.grad is None for p in encoder.parameters())
    assert not any("encoder" in n for n in pill.adapter_parameters(model))
    out = model.generate(ids, images=images, max_new_tokens=2, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out.shape == (1, 11)
    bad = pill.inject_pill(make_llama(), vision_dim=VISION_DIM, image_token_id=IMAGE_TOKEN,
                           vision_encoder=lambda images: images.flatten(1))
    with pytest.raises(ValueError, match=r"vision encoder must return features \[N, tokens, C=24\]"):
        bad(input_ids=ids, images=images)
    with pytest.raises(ValueError, match="no vision encoder"):
        make_model("pill")(input_ids=ids, images=images)


def test_overwriting_an_adapter_where_directories_cannot_be_exchanged(tmp_path, monkeypatch):
    monkeypatch.setattr("pill.files._exchange", lambda a, b: False)
    model = make_model("pill")
    path = pill.save_adapter(model, tmp_path / "a")
    randomize_adapters(model)
    pill.save_adapter(model, path)
    fresh = make_model("pill")
    pill.load_adapter(fresh, path)
    for name, p in pill.adapter_parameters(fresh).items():
        assert torch.equal(p, pill.adapter_parameters(model)[name]), name
    assert sorted(os.listdir(tmp_path)) == ["a"]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_damaged_weights_file_is_an_error_naming_it(tmp_path, damage):
    model = make_model("pill")
    path = pill.save_adapter(model, tmp_path / "a")
    weights = path / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[:len(data) // 2], "garbage": os.urandom(len(data)), "empty": b""}[damage])
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors: not a readable safetensors file.*truncated "
                                         r"or corrupt"):
        pill.load_adapter(model, path)


@pytest.mark.parametrize("content", ['{"pill_type": "pill", "pill_form', "\x00\xff garbage", "[1, 2]"])
def test_a_damaged_adapter_config_is_an_error_naming_it(tmp_path, content):
    model = make_model("pill")
    path = pill.save_adapter(model, tmp_path / "a")
    (path / "adapter_config.json").write_bytes(content.encode("latin-1"))
    with pytest.raises(ValueError, match=r"adapter_config\.json: (not valid JSON|expected an adapter configuration)"):
        pill.load_adapter(model, path)
    with pytest.raises(ValueError, match=r"adapter_config\.json"):
        pill.load_pretrained_adapter(make_llama(), path)


def test_the_backend_is_a_run_time_choice_not_part_of_the_adapter(tmp_path):
    """An adapter saved from a model built with backend="eager" loads into one built with the default, and the
    saved configuration does not name a backend (adapters written before this rule still load)."""
    eager = pill.inject_pill(make_llama(), pill.PillConfig(adapter_dim=5, backend="eager"), vision_dim=VISION_DIM,
                             image_token_id=IMAGE_TOKEN)
    randomize_adapters(eager)
    path = pill.save_adapter(eager, tmp_path / "a")
    assert "backend" not in json.loads((path / "adapter_config.json").read_text())["config"]
    default = pill.inject_pill(make_llama(), pill.PillConfig(adapter_dim=5), vision_dim=VISION_DIM,
                               image_token_id=IMAGE_TOKEN)
    pill.load_adapter(default, path)
    for name, p in pill.adapter_parameters(default).items():
        assert torch.equal(p, pill.adapter_parameters(eager)[name]), name
    saved = json.loads((path / "adapter_config.json").read_text())
    saved["config"]["backend"] = "eager"  # as written by earlier versions
    (path / "adapter_config.json").write_text(json.dumps(saved))
    pill.load_adapter(default, path)
    loaded = pill.load_pretrained_adapter(make_llama(), path)
    assert pill.kernel_backend(loaded) is None and loaded.model.layers[0].kernel_backend is None


@pytest.mark.parametrize("method", ["pill", "pill_query_head", "lavin", "llama_adapter_v2"])
def test_an_adapter_trained_under_one_backend_loads_and_runs_under_another(method, tmp_path, resolved_backends):
    """Saved from a model whose ops ran on eager, loaded with load_pretrained_adapter(backend=...) for every other
    backend that runs here: the same logits, and the ops really run on the asked backend (recorded at dispatch)."""
    import pill_kernels as pk

    import copy

    seen = resolved_backends
    base = make_llama()
    trained = inject(method, copy.deepcopy(base))
    pill.set_stage(trained, trained.multimodal.config.stages[-1])  # every part active (PILL's MAG, ...)
    randomize_adapters(trained)
    pill.set_kernel_backend(trained, "eager")
    path = pill.save_adapter(trained, tmp_path / method)
    ids, features, extra = batch_for(method)
    with torch.no_grad():
        expected = trained(input_ids=ids, image_features=features, **extra).logits
    assert seen and {b for _, b in seen} == {"eager"}
    others = [b for b in ("cpp", "triton") if all(b in pk.available_backends(op, "cpu") for op, _ in seen)]
    if not others:
        pytest.skip("no backend besides eager runs these ops here")
    for backend in others:
        seen.clear()
        loaded = pill.load_pretrained_adapter(copy.deepcopy(base), path, backend=backend)
        assert pill.kernel_backend(loaded) == backend
        with torch.no_grad():
            got = loaded(input_ids=ids, image_features=features, **extra).logits
        assert seen and {b for _, b in seen} == {backend}, (backend, sorted(set(seen)))
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
