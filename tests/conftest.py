import hashlib
import os

import pytest
import torch

# Without a GPU, Triton kernels run on CPU tensors through the interpreter, which must be chosen before triton
# is first imported (importing torch does not import it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

VOCAB = 96
IMAGE_TOKEN = VOCAB + 3  # outside the vocabulary, as the seed's <image_placeholder>
VISION_DIM = 24


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A different random stream per test (fresh inputs), reproducible per test name; PILL_TEST_SEED varies it."""
    salt = os.environ.get("PILL_TEST_SEED", "0")
    seed = int(hashlib.sha256(f"{salt}:{request.node.nodeid}".encode()).hexdigest()[:8], 16)
    torch.manual_seed(seed)
    yield


@pytest.fixture
def resolved_backends(monkeypatch):
    """[(op, backend)] of every fused-op call from here on: the backend each call actually resolved to."""
    import pill_kernels.dispatch as dispatch

    seen, resolve = [], dispatch.resolve

    def recording(op, device, backend=None, shape=None):
        chosen = resolve(op, device, backend, shape)
        seen.append((op, chosen))
        return chosen

    monkeypatch.setattr(dispatch, "resolve", recording)
    return seen


def tiny_llama_config(num_layers=3, heads=4, kv_heads=2, hidden=40, attn="sdpa"):
    """A few layers, GQA (heads/kv_heads), a hidden size that is no power of two."""
    return LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=56, num_hidden_layers=num_layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
                       attn_implementation=attn, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def make_llama(dtype=torch.float64, **kwargs):
    model = LlamaForCausalLM(tiny_llama_config(**kwargs)).to(dtype).eval()
    return model


def randomize_adapters(model, std=0.2):
    """Zero-initialised adapters hide bugs: give every adapter parameter a random value."""
    import pill

    with torch.no_grad():
        for name, p in pill.adapter_parameters(model).items():
            if "norm" in name and "multimodal" not in name:
                p.copy_(1.0 + std * torch.randn_like(p))
            else:
                p.copy_(std * torch.randn_like(p))
    return model


def multimodal_batch(batch=2, seq=11, image_tokens=3, images=(True, False), vision_dim=VISION_DIM,
                     dtype=torch.float64):
    """input_ids with an image placeholder run in the rows flagged in `images`, and matching features."""
    ids = torch.randint(3, VOCAB, (batch, seq))
    for row, has_image in enumerate(images[:batch]):
        if has_image:
            ids[row, 2:2 + image_tokens] = IMAGE_TOKEN
    n_images = sum(bool(x) for x in images[:batch])
    features = torch.randn(n_images, image_tokens, vision_dim, dtype=dtype) if n_images else None
    return ids, features


def assert_gradients_match(names, grads, expected, tol, what=""):
    """Each gradient equals its independent formulation's (None there: none or zero here)."""
    for name, g, sg in zip(names, grads, expected):
        if sg is None:
            assert g is None or g.abs().max() == 0, name
            continue
        assert g is not None, f"no gradient for {name}"
        torch.testing.assert_close(g, sg, rtol=tol * 10, atol=tol, msg=lambda m: f"{what}{name}: {m}")

