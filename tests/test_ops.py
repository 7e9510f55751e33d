"""The fused ops: references against the seed formulations, the custom ops against the references (outputs
and every gradient, all dtypes), gradcheck, opcheck, input validation and backend dispatch."""
import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import pill_kernels as pk
from pill_kernels import reference as ref

LOW_PRECISION = [torch.bfloat16, torch.float16]
MASK_KINDS = ["all_text", "all_image", "alternating", "one_image", "random"]


def image_mask(kind, tokens):
    if kind == "all_text":
        return torch.zeros(tokens, dtype=torch.bool)
    if kind == "all_image":
        return torch.ones(tokens, dtype=torch.bool)
    if kind == "alternating":
        return torch.arange(tokens) % 2 == 1
    if kind == "one_image":
        mask = torch.zeros(tokens, dtype=torch.bool)
        mask[tokens // 2] = True
        return mask
    return torch.rand(tokens) < 0.3


def assert_matches_reference(out, out_ref_lowp, out_ref_fp64, atol=1e-5, what="output"):
    """DESIGN.md's rule: error against the fp64 reference at most 2x the reference's own error in that dtype
    (plus a small atol); in fp32/fp64 compare directly."""
    if out.dtype in LOW_PRECISION:
        err = (out.double() - out_ref_fp64).abs().max().item()
        ref_err = (out_ref_lowp.double() - out_ref_fp64).abs().max().item()
        assert err <= 2 * ref_err + atol, f"{what}: error {err:.3e} > 2 x reference error {ref_err:.3e} + {atol}"
    else:
        tol = 1e-10 if out.dtype == torch.float64 else 1e-5
        torch.testing.assert_close(out.double(), out_ref_fp64, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


def routed_inputs(tokens, hidden=40, rank=5, experts=2, norm=True, dtype=torch.float64, mask="random"):
    x = torch.randn(tokens, hidden, dtype=dtype)
    w_down = 0.3 * torch.randn(experts, hidden, rank, dtype=dtype)
    w_gate = 0.3 * torch.randn(experts, hidden, rank, dtype=dtype)
    w_up = 0.3 * torch.randn(experts, rank, hidden, dtype=dtype)
    ids = image_mask(mask, tokens).long() if experts == 2 else torch.randint(0, experts, (tokens,))
    norm_weight = (1 + 0.2 * torch.randn(hidden, dtype=dtype)) if norm else None
    return x, w_down, w_gate, w_up, ids, norm_weight


def seed_momae(x, w_down, w_gate, w_up, image, norm_weight, eps):
    """The PILL seed: both experts on every token, then `where` on the modality mask."""
    n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm_weight if norm_weight is not None else x
    glu = lambda e: (F.silu(n @ w_gate[e]) * (n @ w_down[e])) @ w_up[e]  # noqa: E731
    return n + torch.where(image[:, None].bool(), glu(1), glu(0))


# ------------------------------------------------------------------------------------------------------
# Routed GLU adapter
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tokens", [1, 7, 33])
@pytest.mark.parametrize("mask", MASK_KINDS)
@pytest.mark.parametrize("norm", [False, True])
def test_routed_glu_reference_equals_seed_formulation(tokens, mask, norm):
    x, wd, wg, wu, ids, nw = routed_inputs(tokens, norm=norm, mask=mask)
    torch.testing.assert_close(ref.routed_glu_adapter(x, wd, wg, wu, ids, nw, 1e-6),
                               seed_momae(x, wd, wg, wu, ids, nw, 1e-6), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("experts,norm", [(1, True), (2, True), (2, False), (3, True)])
def test_routed_glu_op_matches_reference_with_gradients(dtype, experts, norm):
    inputs64 = routed_inputs(13, hidden=24, rank=3, experts=experts, norm=norm)
    x, wd, wg, wu, ids, nw = inputs64
    floats = [t for t in (x, wd, wg, wu, nw) if t is not None]
    grad_y = torch.randn_like(x)

    def run(fn, dt):
        leaves = [t.to(dt).requires_grad_() for t in floats]
        it = iter(leaves)
        args = [next(it) if t is not None and t.is_floating_point() else t for t in (x, wd, wg, wu, ids, nw)]
        y = fn(*args)
        grads = torch.autograd.grad(y, leaves, grad_y.to(dt))
        return [y.detach()] + list(grads)

    op = lambda x, wd, wg, wu, ids, nw: pk.routed_glu_adapter(  # noqa: E731
        x, wd, wg, wu, ids if experts > 1 else None, norm_weight=nw, backend="eager")
    reference = lambda *a: ref.routed_glu_adapter(*a)  # noqa: E731
    got, lowp, exact = run(op, dtype), run(reference, dtype), run(reference, torch.float64)
    for name, g, lp, ex in zip(["y", "dx", "dw_down", "dw_gate", "dw_up", "dnorm"], got, lowp, exact):
        assert g.dtype == dtype
        assert_matches_reference(g, lp, ex, atol=1e-2 if dtype in LOW_PRECISION else 0, what=name)


def test_routed_glu_expert_without_tokens_gets_zero_gradient():
    x, wd, wg, wu, _, nw = routed_inputs(9, experts=3)
    ids = torch.tensor([0, 2, 0, 2, 2, 0, 0, 2, 0])
    wd.requires_grad_()
    pk.routed_glu_adapter(x, wd, wg, wu, ids, norm_weight=nw).sum().backward()
    assert wd.grad[1].abs().max() == 0
    assert wd.grad[0].abs().max() > 0 and wd.grad[2].abs().max() > 0


def test_routed_glu_gradcheck():
    x, wd, wg, wu, ids, nw = routed_inputs(5, hidden=6, rank=3)
    args = [t.requires_grad_() for t in (x, wd, wg, wu, nw)]
    assert torch.autograd.gradcheck(lambda x, a, b, c, n: pk.routed_glu_adapter(x, a, b, c, ids, norm_weight=n),
                                    args)


@pytest.mark.parametrize("experts,norm", [(1, False), (2, True)])
def test_routed_glu_opcheck(experts, norm):
    x, wd, wg, wu, ids, nw = routed_inputs(6, hidden=8, rank=3, experts=experts, norm=norm)
    args = [t.requires_grad_() if t is not None and t.is_floating_point() else t for t in (x, wd, wg, wu)]
    opcheck(torch.ops.pill_kernels.routed_glu_adapter.default,
            (*args, ids if experts > 1 else None, nw.requires_grad_() if nw is not None else None, 1e-6, "eager"))


def test_routed_glu_leading_dims_and_bool_ids():
    x, wd, wg, wu, ids, nw = routed_inputs(12, norm=False)
    y = pk.routed_glu_adapter(x.view(3, 4, -1), wd, wg, wu, ids.bool().view(3, 4))
    torch.testing.assert_close(y.view(12, -1), ref.routed_glu_adapter(x, wd, wg, wu, ids))


# ------------------------------------------------------------------------------------------------------
# Soft-routed adapter (LaVIN)
# ------------------------------------------------------------------------------------------------------

def soft_inputs(tokens=9, hidden=12, rank=4, experts=2, dtype=torch.float64, norm=True, dropout=True):
    return dict(
        x=torch.randn(tokens, hidden, dtype=dtype), w_down=0.3 * torch.randn(hidden, rank, dtype=dtype),
        b_down=0.1 * torch.randn(rank, dtype=dtype), w_up=0.3 * torch.randn(experts, rank, hidden, dtype=dtype),
        b_up=0.1 * torch.randn(experts, hidden, dtype=dtype),
        routing_weights=torch.softmax(torch.randn(tokens, experts, dtype=dtype), -1),
        dropout_mask=((torch.rand(tokens, rank) > 0.25).to(dtype) / 0.75) if dropout else None,
        norm_weight=(1 + 0.2 * torch.randn(hidden, dtype=dtype)) if norm else None)


def test_soft_routed_reference_equals_explicit_sum():
    a = soft_inputs()
    n = ref.rms_norm(a["x"], a["norm_weight"], 1e-6)
    z = (n @ a["w_down"] + a["b_down"]) * a["dropout_mask"]
    expected = n + 0.5 * sum(a["routing_weights"][:, e:e + 1] * (z @ a["w_up"][e] + a["b_up"][e]) for e in range(2))
    torch.testing.assert_close(ref.soft_routed_adapter(**a, eps=1e-6, scale=0.5), expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm,dropout", [(True, True), (False, False)])
def test_soft_routed_op_matches_reference_with_gradients(dtype, norm, dropout):
    a = soft_inputs(norm=norm, dropout=dropout)
    names = [k for k, v in a.items() if v is not None and k != "dropout_mask"]
    grad_y = torch.randn_like(a["x"])

    def run(fn, dt):
        args = {k: (v.to(dt) if v is not None else None) for k, v in a.items()}
        leaves = [args[k].requires_grad_() for k in names]
        y = fn(**args)
        return [y.detach()] + list(torch.autograd.grad(y, leaves, grad_y.to(dt)))

    op = lambda **kw: pk.soft_routed_adapter(**kw, scale=0.7, backend="eager")  # noqa: E731
    reference = lambda **kw: ref.soft_routed_adapter(**kw, scale=0.7)  # noqa: E731
    got, lowp, exact = run(op, dtype), run(reference, dtype), run(reference, torch.float64)
    for name, g, lp, ex in zip(["y"] + names, got, lowp, exact):
        assert_matches_reference(g, lp, ex, atol=1e-2 if dtype in LOW_PRECISION else 0, what=name)


def test_soft_routed_gradcheck_and_opcheck():
    a = soft_inputs(tokens=4, hidden=6, rank=2)
    keys = [k for k in a if k != "dropout_mask"]
    for k in keys:
        a[k].requires_grad_()

    def fn(*tensors):
        kw = dict(zip(keys, tensors))
        return pk.soft_routed_adapter(**kw, dropout_mask=a["dropout_mask"], scale=1.5)

    assert torch.autograd.gradcheck(fn, [a[k] for k in keys])
    opcheck(torch.ops.pill_kernels.soft_routed_adapter.default,
            (a["x"], a["w_down"], a["b_down"], a["w_up"], a["b_up"], a["routing_weights"], a["dropout_mask"],
             a["norm_weight"], 1e-6, 1.5, "eager"))


# ------------------------------------------------------------------------------------------------------
# Modality gate
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mask", MASK_KINDS)
def test_modality_gate_reference_equals_seed_formulation(mask):
    x, w, v = torch.randn(10, 12, dtype=torch.float64), torch.randn(12, 3, dtype=torch.float64), \
        torch.randn(10, 3, 5, dtype=torch.float64)
    image = image_mask(mask, 10)
    g = torch.tanh(x @ w)
    seed = torch.where(image[:, None, None].expand_as(v), g[..., None] * v, v)  # mask repeated to full width
    torch.testing.assert_close(ref.modality_gate(x, w, v, image), seed)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_modality_gate_op_matches_reference_with_gradients(dtype):
    x, w, v = torch.randn(17, 12, dtype=torch.float64), 0.3 * torch.randn(12, 3, dtype=torch.float64), \
        torch.randn(17, 3, 5, dtype=torch.float64)
    image = image_mask("random", 17)
    grad = torch.randn_like(v)

    def run(fn, dt):
        leaves = [t.to(dt).requires_grad_() for t in (x, w, v)]
        y = fn(*leaves, image)
        return [y.detach()] + list(torch.autograd.grad(y, leaves, grad.to(dt)))

    op = lambda *a: pk.modality_gate(*a, backend="eager")  # noqa: E731
    got, lowp, exact = run(op, dtype), run(ref.modality_gate, dtype), run(ref.modality_gate, torch.float64)
    for name, g, lp, ex in zip(["v_out", "dx", "dw_gate", "dv"], got, lowp, exact):
        assert_matches_reference(g, lp, ex, atol=1e-2 if dtype in LOW_PRECISION else 0, what=name)


def test_modality_gate_gradcheck_and_opcheck():
    x, w, v = [torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((5, 6), (6, 2), (5, 2, 3))]
    image = torch.tensor([True, False, True, True, False])
    assert torch.autograd.gradcheck(lambda a, b, c: pk.modality_gate(a, b, c, image), (x, w, v))
    opcheck(torch.ops.pill_kernels.modality_gate.default, (x, w, v, image, "eager"))


# ------------------------------------------------------------------------------------------------------
# Gated attention
# ------------------------------------------------------------------------------------------------------

def naive_gated_attention(q, k, v, gate_logits, image, padding, pk_, pv, pg, scale):
    """Loops over batch, head and query: the definition, written out."""
    batch, heads, seq_q, _ = q.shape
    seq_k, group = k.shape[2], heads // k.shape[1]
    out = torch.zeros_like(q)
    for b in range(batch):
        for h in range(heads):
            for i in range(seq_q):
                pos = seq_k - seq_q + i
                keys = [j for j in range(pos + 1) if padding is None or padding[b, j]]
                if keys:
                    s = torch.stack([q[b, h, i] @ k[b, h // group, j] * scale for j in keys])
                    p = torch.softmax(s, 0)
                    for pj, j in zip(p, keys):
                        mult = torch.tanh(gate_logits[b, h, j]) if gate_logits is not None and image[b, j] else 1.0
                        out[b, h, i] += pj * mult * v[b, h // group, j]
                if pk_ is not None:
                    p = torch.softmax(pk_[b, h // group] @ q[b, h, i] * scale, 0)
                    out[b, h, i] += torch.tanh(pg[h]) * (p @ pv[b, h // group])
    return out


def attention_inputs(batch=2, heads=4, kv_heads=2, seq_q=6, seq_k=6, head_dim=8, prompts=3, gate=True,
                     prompt=True, padding=True, dtype=torch.float64):
    t = lambda *s: torch.randn(*s, dtype=dtype)  # noqa: E731
    pad = None
    if padding:
        pad = torch.ones(batch, seq_k, dtype=torch.bool)
        pad[0, :2] = False  # left padding: the first queries of row 0 see no key
        pad[-1, -1] = False
    return dict(q=t(batch, heads, seq_q, head_dim), k=t(batch, kv_heads, seq_k, head_dim),
                v=t(batch, kv_heads, seq_k, head_dim),
                gate_logits=t(batch, heads, seq_k) if gate else None,
                image_mask=(torch.rand(batch, seq_k) < 0.5) if gate else None, key_padding_mask=pad,
                prompt_k=t(batch, kv_heads, prompts, head_dim) if prompt else None,
                prompt_v=t(batch, kv_heads, prompts, head_dim) if prompt else None,
                prompt_gate=t(heads) if prompt else None)


@pytest.mark.parametrize("case", ["plain", "gate", "prompt", "gate_prompt_padding", "decode", "mha"])
def test_gated_attention_reference_and_op_equal_the_definition(case):
    kw = dict(gate=case in ("gate", "gate_prompt_padding", "decode"), prompt=case in ("prompt",
              "gate_prompt_padding", "decode"), padding=case in ("gate_prompt_padding", "decode"))
    if case == "decode":
        kw.update(seq_q=1, seq_k=7)
    if case == "mha":
        kw.update(kv_heads=4)
    a = attention_inputs(**kw)
    scale = 0.3
    expected = naive_gated_attention(a["q"], a["k"], a["v"], a["gate_logits"], a["image_mask"],
                                     a["key_padding_mask"], a["prompt_k"], a["prompt_v"], a["prompt_gate"], scale)
    torch.testing.assert_close(ref.gated_attention(**a, scale=scale), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(pk.gated_attention(**a, scale=scale, backend="eager"), expected, rtol=1e-10,
                               atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_attention_op_gradients_match_reference(dtype):
    a = attention_inputs()
    names = ["q", "k", "v", "gate_logits", "prompt_k", "prompt_v", "prompt_gate"]
    grad = torch.randn_like(a["q"])

    def run(fn, dt):
        args = {k: (v.to(dt) if v is not None and v.is_floating_point() else v) for k, v in a.items()}
        leaves = [args[n].requires_grad_() for n in names]
        o = fn(**args)
        return [o.detach()] + list(torch.autograd.grad(o, leaves, grad.to(dt)))

    op = lambda **kw: pk.gated_attention(**kw, backend="eager")  # noqa: E731
    got, lowp, exact = run(op, dtype), run(ref.gated_attention, dtype), run(ref.gated_attention, torch.float64)
    for name, g, lp, ex in zip(["o"] + names, got, lowp, exact):
        assert_matches_reference(g, lp, ex, atol=2e-2 if dtype in LOW_PRECISION else 0, what=name)


def test_gated_attention_gradcheck_and_opcheck():
    a = attention_inputs(batch=1, heads=2, kv_heads=1, seq_q=3, seq_k=3, head_dim=4, prompts=2)
    names = ["q", "k", "v", "gate_logits", "prompt_k", "prompt_v", "prompt_gate"]
    for n in names:
        a[n].requires_grad_()

    def fn(*tensors):
        kw = dict(a, **dict(zip(names, tensors)))
        return pk.gated_attention(**kw)

    assert torch.autograd.gradcheck(fn, [a[n] for n in names])
    opcheck(torch.ops.pill_kernels.gated_attention.default,
            (a["q"], a["k"], a["v"], a["gate_logits"], a["image_mask"], a["key_padding_mask"], a["prompt_k"],
             a["prompt_v"], a["prompt_gate"], True, 0.5, "eager"))


# ------------------------------------------------------------------------------------------------------
# Validation and dispatch
# ------------------------------------------------------------------------------------------------------

def test_bad_inputs_raise_errors_naming_the_problem():
    x, wd, wg, wu, ids, nw = routed_inputs(6)
    with pytest.raises(ValueError, match=r"expert_ids must lie in \[0, 2\).*\[0, 5\]"):
        pk.routed_glu_adapter(x, wd, wg, wu, torch.tensor([0, 1, 5, 0, 0, 1]))
    with pytest.raises(ValueError, match="expert_ids must have shape"):
        pk.routed_glu_adapter(x, wd, wg, wu, ids[:4])
    with pytest.raises(TypeError, match="expert_ids must be an integer"):
        pk.routed_glu_adapter(x, wd, wg, wu, ids.double())
    with pytest.raises(ValueError, match="expert_ids is required"):
        pk.routed_glu_adapter(x, wd, wg, wu, None)
    with pytest.raises(TypeError, match="w_down has dtype torch.float32 but x has torch.float64"):
        pk.routed_glu_adapter(x, wd.float(), wg, wu, ids)
    with pytest.raises(TypeError, match="x must be float16, bfloat16, float32 or float64"):
        pk.routed_glu_adapter(x.long(), wd, wg, wu, ids)
    with pytest.raises(ValueError, match=r"w_up must have shape \[E, r, D\]"):
        pk.routed_glu_adapter(x, wd, wg, wu[:, :, :-1], ids)
    with pytest.raises(ValueError, match="norm_weight must have shape"):
        pk.routed_glu_adapter(x, wd, wg, wu, ids, norm_weight=nw[:-1])
    with pytest.raises(ValueError, match="is on meta but x is on cpu"):
        pk.routed_glu_adapter(x, wd.to("meta"), wg, wu, ids)
    v = torch.randn(6, 3, 4, dtype=torch.float64)
    w = torch.randn(40, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="image_mask must have shape"):
        pk.modality_gate(x, w, v, torch.ones(5, dtype=torch.bool))
    with pytest.raises(TypeError, match="image_mask must be a bool or integer"):
        pk.modality_gate(x, w, v, torch.ones(6))
    with pytest.raises(ValueError, match="v must have shape"):
        pk.modality_gate(x, w, v[:, :2], torch.ones(6, dtype=torch.bool))
    a = attention_inputs()
    with pytest.raises(ValueError, match="multiple of the key/value heads"):
        pk.gated_attention(a["q"][:, :3], a["k"], a["v"])
    with pytest.raises(ValueError, match="gate_logits and image_mask go together"):
        pk.gated_attention(a["q"], a["k"], a["v"], gate_logits=a["gate_logits"])
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        pk.gated_attention(a["q"], a["k"], a["v"], key_padding_mask=a["key_padding_mask"][:, :-1])
    s = soft_inputs()
    with pytest.raises(ValueError, match=r"routing_weights must have shape \[\.\.\., E\]"):
        pk.soft_routed_adapter(**dict(s, routing_weights=s["routing_weights"][:, :1]))


def test_missing_backends_raise_clear_errors_and_auto_says_what_it_picks():
    x, wd, wg, wu, ids, nw = routed_inputs(4)
    for backend in ("triton", "cuda"):
        with pytest.raises(pk.BackendUnavailableError, match=f"backend '{backend}' is not available for op "
                                                             f"'routed_glu_adapter'"):
            pk.routed_glu_adapter(x, wd, wg, wu, ids, backend=backend)
    with pytest.raises(ValueError, match="backend must be one of"):
        pk.routed_glu_adapter(x, wd, wg, wu, ids, backend="fast")
    chosen, why = pk.explain("modality_gate", "cpu")
    assert chosen == "eager" and "triton: not built" in why
    with pk.use_backend("triton"):
        assert pk.get_backend() == "triton"
        with pytest.raises(pk.BackendUnavailableError):
            pk.modality_gate(torch.randn(2, 4), torch.randn(4, 1), torch.randn(2, 1, 3), torch.ones(2, dtype=bool))
    assert pk.get_backend() == "auto"


def test_backend_from_environment(monkeypatch):
    monkeypatch.setenv("PILL_KERNELS_BACKEND", "eager")
    assert pk.get_backend() == "eager"
    monkeypatch.setenv("PILL_KERNELS_BACKEND", "gpu")
    with pytest.raises(ValueError, match="PILL_KERNELS_BACKEND must be one of"):
        pk.get_backend()


def test_ops_compile_without_graph_breaks():
    x, wd, wg, wu, ids, nw = routed_inputs(8, norm=True)
    v = torch.randn(8, 2, 4, dtype=torch.float64)
    wgate = torch.randn(40, 2, dtype=torch.float64)

    def step(x):
        a = pk.routed_glu_adapter(x, wd[:1], wg[:1], wu[:1], norm_weight=nw, backend="eager")
        return pk.modality_gate(a, wgate, v, ids.bool(), backend="eager").sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), step(x))
