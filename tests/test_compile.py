"""torch.compile with the inductor backend on CPU (generated C++ code, not just graph capture): a PILL decoder
layer as one graph and a small PILL model's training step, on the eager and the C++ backends, against the same
code run uncompiled."""
import pytest
import torch

import pill
import pill_kernels as pk
from conftest import multimodal_batch
from op_testing import require_backend
from test_models import make_model

BACKENDS = ["eager", "cpp"]


def _require(backend):
    for op in ("routed_glu_adapter", "modality_gate"):
        require_backend(op, backend)


# The per-query-head gate runs gated attention, which has no C++ kernel.
@pytest.mark.parametrize("backend,gate_per", [("eager", "kv_head"), ("eager", "query_head"), ("cpp", "kv_head")])
def test_pill_decoder_layer_compiles_with_inductor(backend, gate_per):
    _require(backend)
    model = make_model("pill" if gate_per == "kv_head" else "pill_query_head", dtype=torch.float32)
    layer = model.model.layers[1]
    params = [p.requires_grad_() for n, p in layer.named_parameters() if n.startswith("pill_")]
    hidden = torch.randn(2, 7, model.config.hidden_size)
    cos_sin = model.model.rotary_emb(hidden, torch.arange(7)[None].expand(2, -1))
    image = (torch.rand(2, 7) < 0.5).long()

    def run(h):
        out = layer(h, position_embeddings=cos_sin, mm_token_type_ids=image)
        return out[0] if isinstance(out, tuple) else out

    def forward_backward(fn):
        h = hidden.clone().requires_grad_()
        with pk.use_backend(backend):
            out = fn(h)
            grads = torch.autograd.grad(out.square().sum(), [h] + params)
        return out.detach(), grads

    torch._dynamo.reset()
    compiled = torch.compile(run, fullgraph=True, backend="inductor")
    (out_c, grads_c), (out_e, grads_e) = forward_backward(compiled), forward_backward(run)
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
    for g_c, g_e in zip(grads_c, grads_e):
        torch.testing.assert_close(g_c, g_e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_small_pill_model_training_step_compiles_with_inductor(backend):
    _require(backend)
    model = make_model("pill", dtype=torch.float32)
    model.train()
    params = pill.stage_parameters(model, 2)
    ids, features = multimodal_batch(2, 9, dtype=torch.float32)

    def loss_fn(ids, features):
        return model(input_ids=ids, image_features=features, labels=ids).loss

    def step(fn):
        torch.manual_seed(0)
        with pk.use_backend(backend):
            loss = fn(ids, features)
            return loss.detach(), torch.autograd.grad(loss, list(params.values()))

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, backend="inductor")
    (loss_c, grads_c), (loss_e, grads_e) = step(compiled), step(loss_fn)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    for name, g_c, g_e in zip(params, grads_c, grads_e):
        torch.testing.assert_close(g_c, g_e, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
