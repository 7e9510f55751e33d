"""The Triton backend beyond the shared op tests of test_ops.py: the shape and mask matrix of docs/correctness.md,
poisoned outputs, determinism, torch.compile, and the models running on it. Without a GPU these run through the Triton
interpreter (conftest.py sets TRITON_INTERPRET=1); on a GPU machine the same tests run the compiled kernels on
the GPU (every tensor is created there)."""
import math

import pytest
import torch

import pill_kernels as pk
from pill_kernels import reference as ref
from pill_kernels.triton import INTERPRET

from op_testing import (LOW_PRECISION, assert_matches_reference, image_mask, require_backend, rounded_to,
                        routed_inputs)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NOT_DIFFERENTIABLE = ("dropout_mask",)


@pytest.fixture(autouse=True)
def _triton_available():
    for op in ("routed_glu_adapter", "soft_routed_adapter", "modality_gate", "gated_attention"):
        require_backend(op, "triton", DEVICE)
    with torch.device(DEVICE):
        yield


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """Every floating tensor the launch code allocates (outputs, partial sums) starts as NaN, so an element a
    kernel forgets to write shows up."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(math.nan) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))


def grads_of(fn, inputs, grad_out, dtype):
    """fn's output and the gradients of every floating input, with the inputs cast to dtype."""
    leaves = {k: v.to(dtype, copy=True).requires_grad_() for k, v in inputs.items()
              if isinstance(v, torch.Tensor) and v.is_floating_point() and k not in NOT_DIFFERENTIABLE}
    args = {k: leaves.get(k, v.to(dtype) if k in NOT_DIFFERENTIABLE and v is not None else v)
            for k, v in inputs.items()}
    out = fn(**args)
    return [out.detach()] + list(torch.autograd.grad(out, list(leaves.values()), grad_out.to(dtype)))


def check_against_reference(op_fn, ref_fn, inputs, grad_out, dtype, names):
    inputs, grad_out = rounded_to(dtype, inputs), grad_out.to(dtype).double()
    got = grads_of(op_fn, inputs, grad_out, dtype)
    lowp = grads_of(ref_fn, inputs, grad_out, dtype)
    exact = grads_of(ref_fn, inputs, grad_out, torch.float64)
    for name, g, lp, ex in zip(names, got, lowp, exact):
        assert g.dtype == dtype, name
        assert not torch.isnan(g).any(), f"{name}: unwritten (NaN-poisoned) elements"
        assert_matches_reference(g, lp, ex, atol=1e-2 if dtype in LOW_PRECISION else 0, what=name)


ROUTED_SHAPES = [  # (tokens, hidden, rank, experts): T = 1, odd T over several tiles, D not a power of two (and
    (1, 40, 5, 2),  # more than one D chunk), r not a multiple of 16, E = 1 and 3
    (37, 72, 20, 2),
    (19, 24, 3, 1),
    (33, 48, 17, 3),
]


# The modality masks route between two experts; other expert counts get random ids.
ROUTED_CASES = [(shape, mask) for shape in ROUTED_SHAPES
                for mask in (["all_text", "all_image", "alternating", "one_image", "random"] if shape[3] == 2
                             else ["random"])]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,mask", ROUTED_CASES, ids=lambda c: "T{}-D{}-r{}-E{}".format(*c)
                         if isinstance(c, tuple) else c)
def test_routed_glu_matrix(poisoned_allocations, shape, mask, dtype):
    tokens, hidden, rank, experts = shape
    x, wd, wg, wu, ids, nw = routed_inputs(tokens, hidden, rank, experts, norm=True, mask=mask)
    inputs = dict(x=x, w_down=wd, w_gate=wg, w_up=wu, expert_ids=ids if experts > 1 else None, norm_weight=nw)
    op = lambda **a: pk.routed_glu_adapter(**a, backend="triton")  # noqa: E731
    reference = lambda **a: ref.routed_glu_adapter(**a)  # noqa: E731
    check_against_reference(op, reference, inputs, torch.randn_like(x), dtype,
                            ["y", "dx", "dw_down", "dw_gate", "dw_up", "dnorm"])


def test_routed_glu_without_norm_and_expert_without_tokens(poisoned_allocations):
    x, wd, wg, wu, _, _ = routed_inputs(21, 40, 5, 3, norm=False)
    ids = torch.tensor([0, 2] * 10 + [0])
    inputs = dict(x=x, w_down=wd, w_gate=wg, w_up=wu, expert_ids=ids)
    op = lambda **a: pk.routed_glu_adapter(**a, backend="triton")  # noqa: E731
    check_against_reference(op, lambda **a: ref.routed_glu_adapter(**a), inputs, torch.randn_like(x),
                            torch.float32, ["y", "dx", "dw_down", "dw_gate", "dw_up"])
    wd = wd.float().requires_grad_()
    pk.routed_glu_adapter(x.float(), wd, wg.float(), wu.float(), ids, backend="triton").sum().backward()
    assert wd.grad[1].abs().max() == 0 and wd.grad[0].abs().max() > 0


def soft_case(tokens, hidden, rank, experts, norm=True, dropout=True):
    d = torch.float64
    return dict(x=torch.randn(tokens, hidden, dtype=d), w_down=0.3 * torch.randn(hidden, rank, dtype=d),
                b_down=0.1 * torch.randn(rank, dtype=d), w_up=0.3 * torch.randn(experts, rank, hidden, dtype=d),
                b_up=0.1 * torch.randn(experts, hidden, dtype=d),
                routing_weights=torch.softmax(torch.randn(tokens, experts, dtype=d), -1),
                dropout_mask=((torch.rand(tokens, rank) > 0.25).to(d) / 0.75) if dropout else None,
                norm_weight=(1 + 0.2 * torch.randn(hidden, dtype=d)) if norm else None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,norm,dropout", [((1, 40, 8, 2), True, True), ((37, 72, 20, 2), True, False),
                                                ((19, 24, 3, 1), False, True), ((18, 48, 17, 3), True, True)],
                         ids=["T1", "odd-T-no-dropout", "E1-no-norm", "E3"])
def test_soft_routed_matrix(poisoned_allocations, shape, norm, dropout, dtype):
    inputs = soft_case(*shape, norm=norm, dropout=dropout)
    names = ["y"] + [k for k, v in inputs.items() if v is not None and k != "dropout_mask"]
    op = lambda **a: pk.soft_routed_adapter(**a, scale=0.7, backend="triton")  # noqa: E731
    reference = lambda **a: ref.soft_routed_adapter(**a, scale=0.7)  # noqa: E731
    check_against_reference(op, reference, inputs, torch.randn_like(inputs["x"]), dtype, names)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask", ["all_text", "all_image", "alternating", "one_image"])
@pytest.mark.parametrize("shape", [(1, 40, 2, 8), (37, 72, 3, 5), (20, 24, 1, 16)],
                         ids=lambda s: "T{}-D{}-H{}-hd{}".format(*s))
def test_modality_gate_matrix(poisoned_allocations, shape, mask, dtype):
    tokens, hidden, heads, head_dim = shape
    inputs = dict(x=torch.randn(tokens, hidden, dtype=torch.float64),
                  w_gate=0.3 * torch.randn(hidden, heads, dtype=torch.float64),
                  v=torch.randn(tokens, heads, head_dim, dtype=torch.float64), image_mask=image_mask(mask, tokens))
    op = lambda **a: pk.modality_gate(**a, backend="triton")  # noqa: E731
    check_against_reference(op, lambda **a: ref.modality_gate(**a), inputs, torch.randn_like(inputs["v"]), dtype,
                            ["v_out", "dx", "dw_gate", "dv"])


@pytest.mark.parametrize("splits", [2, 5])
def test_weight_gradients_summed_over_token_splits(poisoned_allocations, monkeypatch, splits):
    """On a GPU the weight-gradient kernels split the tokens over several programs and sum the partial slabs;
    the interpreter picks one split, so force several: 7 token tiles in 2 splits (4 + 3) and in 5 (2 tiles
    each, the last split past the end and empty), on every workspace NaN-poisoned."""
    import pill_kernels.triton.modality_gate as gate_kernels
    import pill_kernels.triton.routed_glu_adapter as routed_kernels
    import pill_kernels.triton.soft_routed_adapter as soft_kernels

    for module in (routed_kernels, soft_kernels, gate_kernels):
        monkeypatch.setattr(module, "token_splits", lambda device, d_chunks, experts, tiles: splits)
    tokens = 7 * routed_kernels.token_blocks(40, torch.float32)[0] - 5
    x, wd, wg, wu, ids, nw = routed_inputs(tokens, 40, 5, 2, norm=True)
    check_against_reference(lambda **a: pk.routed_glu_adapter(**a, backend="triton"),
                            lambda **a: ref.routed_glu_adapter(**a),
                            dict(x=x, w_down=wd, w_gate=wg, w_up=wu, expert_ids=ids, norm_weight=nw),
                            torch.randn_like(x), torch.float32, ["y", "dx", "dw_down", "dw_gate", "dw_up", "dnorm"])
    soft = soft_case(tokens, 40, 6, 2)
    check_against_reference(lambda **a: pk.soft_routed_adapter(**a, scale=0.7, backend="triton"),
                            lambda **a: ref.soft_routed_adapter(**a, scale=0.7), soft, torch.randn_like(soft["x"]),
                            torch.float32, ["y"] + [k for k, v in soft.items() if v is not None and k != "dropout_mask"])
    gate = dict(x=torch.randn(tokens, 40, dtype=torch.float64), w_gate=0.3 * torch.randn(40, 3, dtype=torch.float64),
                v=torch.randn(tokens, 3, 5, dtype=torch.float64), image_mask=image_mask("random", tokens))
    check_against_reference(lambda **a: pk.modality_gate(**a, backend="triton"), lambda **a: ref.modality_gate(**a),
                            gate, torch.randn_like(gate["v"]), torch.float32, ["v_out", "dx", "dw_gate", "dv"])


def test_backward_is_deterministic():
    x, wd, wg, wu, ids, nw = (t.float() if t.is_floating_point() else t for t in routed_inputs(45, 40, 5, 2))
    grad = torch.randn_like(x)
    leaves = [t.requires_grad_() for t in (x, wd, wg, wu, nw)]

    def grads():
        y = pk.routed_glu_adapter(x, wd, wg, wu, ids, norm_weight=nw, backend="triton")
        return torch.autograd.grad(y, leaves, grad)

    for a, b in zip(grads(), grads()):
        assert torch.equal(a, b)


def test_triton_ops_compile_without_graph_breaks():
    x, wd, wg, wu, ids, nw = (t.float() if t.is_floating_point() else t for t in routed_inputs(9, 40, 5, 2))
    w_gate = torch.randn(40, 2)
    v = torch.randn(9, 2, 4)

    def step(x):
        a = pk.routed_glu_adapter(x, wd, wg, wu, ids, norm_weight=nw, backend="triton")
        return pk.modality_gate(a, w_gate, v, ids.bool(), backend="triton").square().sum()

    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss_compiled, loss_eager = compiled(x1), step(x2)
    loss_compiled.backward()
    loss_eager.backward()
    torch.testing.assert_close(loss_compiled, loss_eager)
    torch.testing.assert_close(x1.grad, x2.grad)


def test_auto_never_picks_the_interpreter_on_cpu():
    if not INTERPRET:
        pytest.skip("the Triton interpreter is not in use")
    chosen, why = pk.explain("routed_glu_adapter", "cpu")
    assert chosen != "triton" and "triton: Triton on CPU is the interpreter" in why


@pytest.mark.parametrize("method", ["pill", "lavin"])
def test_models_on_the_triton_backend_equal_the_eager_models(method):
    from test_models import all_adapter_params_trainable, batch_for, make_model

    model = make_model(method, dtype=torch.float32)
    params = all_adapter_params_trainable(model)
    ids, features, extra = batch_for(method, seq=9)
    features = features.float()
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0

    def run(backend):
        with pk.use_backend(backend):
            logits = model(input_ids=ids, attention_mask=mask, image_features=features, **extra).logits
        grads = torch.autograd.grad((logits * mask[..., None]).square().sum(), list(params.values()),
                                    allow_unused=True)
        return logits.detach(), grads

    (logits_t, grads_t), (logits_e, grads_e) = run("triton"), run("eager")
    torch.testing.assert_close(logits_t, logits_e, rtol=2e-5, atol=2e-5)
    for name, gt, ge in zip(params, grads_t, grads_e):
        if ge is None:
            assert gt is None, name
            continue
        torch.testing.assert_close(gt, ge, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("method", ["pill", "lavin"])
def test_decoder_layer_on_triton_compiles_as_one_graph(method):
    from test_models import make_model

    model = make_model(method, dtype=torch.float32)
    layer = model.model.layers[1]
    hidden = torch.randn(2, 7, model.config.hidden_size)
    positions = torch.arange(7)[None].expand(2, -1)
    cos_sin = model.model.rotary_emb(hidden, positions)
    kwargs = {"mm_token_type_ids": (torch.rand(2, 7) < 0.5).long()}
    if method == "lavin":
        kwargs = {"mm_routing_weights": torch.softmax(torch.randn(2, model.config.num_hidden_layers, 2), -1)}

    def run(h):
        out = layer(h, position_embeddings=cos_sin, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    torch._dynamo.reset()
    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    with pk.use_backend("triton"):
        h1, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
        out_compiled, out_eager = compiled(h1), run(h2)
        out_compiled.square().sum().backward()
        out_eager.square().sum().backward()
    torch.testing.assert_close(out_compiled, out_eager)
    torch.testing.assert_close(h1.grad, h2.grad)


# ------------------------------------------------------------------------------------------------------
# Gated flash attention
# ------------------------------------------------------------------------------------------------------

def attention_case(batch=2, heads=4, kv_heads=2, seq_q=37, seq_k=37, head_dim=64, prompts=5, gate=True, prompt=True,
                   padding=None, window=None):
    t = lambda *s: torch.randn(*s, dtype=torch.float64)  # noqa: E731
    pad = None
    if padding is not None:
        pad = torch.ones(batch, seq_k, dtype=torch.bool)
        if padding == "left":
            pad[0, :5] = False  # the first queries of row 0 see no key
        else:
            pad[0, -4:] = False
    return dict(q=t(batch, heads, seq_q, head_dim), k=t(batch, kv_heads, seq_k, head_dim),
                v=t(batch, kv_heads, seq_k, head_dim),
                gate_logits=t(batch, heads, seq_k) if gate else None,
                image_mask=(torch.rand(batch, seq_k) < 0.4) if gate else None, key_padding_mask=pad,
                prompt_k=t(batch, kv_heads, prompts, head_dim) if prompt else None,
                prompt_v=t(batch, kv_heads, prompts, head_dim) if prompt else None,
                prompt_gate=t(heads) if prompt else None, window=window)


ATTENTION_CASES = {
    "plain": dict(gate=False, prompt=False),
    "gate": dict(prompt=False),
    "prompt": dict(gate=False),
    "gate_prompt_left_padding": dict(padding="left"),
    "gate_right_padding_mha": dict(kv_heads=4, prompt=False, padding="right"),
    "head_dim_128_gqa_4": dict(heads=4, kv_heads=1, head_dim=128, seq_q=21, seq_k=21),
    "decode_one_token": dict(seq_q=1, seq_k=40, padding="left"),
    "decode_three_tokens": dict(seq_q=3, seq_k=40),
    # Windows shorter and longer than the interpreter's 16-key blocks: the loops skip blocks outside them.
    "window_gate_prompt_left_padding": dict(padding="left", window=7),
    "window_plain_mha": dict(kv_heads=4, gate=False, prompt=False, window=20),
    "window_decode_three_tokens": dict(seq_q=3, seq_k=40, window=5),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_gated_attention_matrix(poisoned_allocations, case, dtype):
    inputs = attention_case(**ATTENTION_CASES[case])
    names = ["o"] + [k for k in ("q", "k", "v", "gate_logits", "prompt_k", "prompt_v", "prompt_gate")
                     if inputs[k] is not None]
    op = lambda **a: pk.gated_attention(**a, backend="triton")  # noqa: E731
    check_against_reference(op, lambda **a: ref.gated_attention(**a), inputs, torch.randn_like(inputs["q"]), dtype,
                            names)


@pytest.mark.parametrize("window", [None, 33])
def test_gated_attention_long_sequence_over_many_blocks(window):
    inputs = attention_case(batch=1, heads=2, kv_heads=1, seq_q=130, seq_k=130, head_dim=64, padding="right",
                            window=window)
    names = ["o", "q", "k", "v", "gate_logits", "prompt_k", "prompt_v", "prompt_gate"]
    op = lambda **a: pk.gated_attention(**a, backend="triton")  # noqa: E731
    check_against_reference(op, lambda **a: ref.gated_attention(**a), inputs, torch.randn_like(inputs["q"]),
                            torch.float32, names)


def test_gated_attention_not_picked_by_auto_without_measurements():
    reason = pk.dispatch.kernel("gated_attention", "triton").auto_skip_reason(DEVICE)
    assert ("interpreter" if DEVICE.type == "cpu" else "not measured faster") in reason


@pytest.mark.parametrize("method", ["pill_query_head", "llama_adapter_v2"])
def test_attention_models_on_the_triton_backend_equal_the_eager_models(method):
    from test_models import all_adapter_params_trainable, batch_for, make_model

    model = make_model(method, dtype=torch.float32)
    params = all_adapter_params_trainable(model)
    ids, features, extra = batch_for(method, seq=9)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding

    def run(backend):
        with pk.use_backend(backend):
            logits = model(input_ids=ids, attention_mask=mask, image_features=features.float(), **extra).logits
        grads = torch.autograd.grad((logits * mask[..., None]).square().sum(), list(params.values()),
                                    allow_unused=True)
        return logits.detach(), grads

    (logits_t, grads_t), (logits_e, grads_e) = run("triton"), run("eager")
    torch.testing.assert_close(logits_t, logits_e, rtol=2e-5, atol=2e-5)
    for name, gt, ge in zip(params, grads_t, grads_e):
        if ge is None:
            assert gt is None, name
            continue
        torch.testing.assert_close(gt, ge, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("method", ["pill", "pill_query_head", "lavin", "llama_adapter_v2"])
def test_cached_generation_on_triton_equals_eager(method):
    from test_models import batch_for, make_model

    if DEVICE.type == "cuda":
        pytest.skip("exact float64 agreement: the GPU kernels run fp16 / bf16 / fp32")
    model = make_model(method)  # float64: the interpreter runs the kernels in fp64, so tokens must agree exactly
    ids, features, extra = batch_for(method, batch=2, seq=9, images=(True, False))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    kwargs = dict(attention_mask=mask, image_features=features, max_new_tokens=4, do_sample=False,
                  eos_token_id=None, pad_token_id=0, use_cache=True, output_logits=True,
                  return_dict_in_generate=True, **extra)
    with pk.use_backend("triton"):
        on_triton = model.generate(ids, **kwargs)
    with pk.use_backend("eager"):
        on_eager = model.generate(ids, **kwargs)
    assert torch.equal(on_triton.sequences, on_eager.sequences)
    for a, b in zip(on_triton.logits, on_eager.logits):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
