"""The fused ops: references against the seed formulations, the custom ops against the references (outputs
and every gradient, all dtypes), gradcheck, opcheck, input validation and backend dispatch."""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import pill_kernels as pk
from pill_kernels import reference as ref

from op_testing import (CPU_BACKENDS, LOW_PRECISION, MASK_KINDS, assert_matches_reference, attention_inputs,
                        gated_attention_definition, image_mask, modality_gate_definition, require_backend,
                        rounded_to, routed_glu_definition, routed_inputs, soft_inputs, soft_routed_definition)

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


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("experts,norm", [(1, True), (2, True), (2, False), (3, True)])
def test_routed_glu_op_matches_reference_with_gradients(backend, dtype, experts, norm):
    require_backend("routed_glu_adapter", backend)
    x, wd, wg, wu, ids, nw = rounded_to(dtype, routed_inputs(13, hidden=24, rank=3, experts=experts, norm=norm))
    floats = [t for t in (x, wd, wg, wu, nw) if t is not None]
    grad_y = torch.randn_like(x).to(dtype).double()

    def run(fn, dt):
        leaves = [t.to(dt).requires_grad_() for t in floats]
        it = iter(leaves)
        args = [next(it) if t is not None and t.is_floating_point() else t for t in (x, wd, wg, wu, ids, nw)]
        y = fn(*args)
        grads = torch.autograd.grad(y, leaves, grad_y.to(dt))
        return [y.detach()] + list(grads)

    op = lambda x, wd, wg, wu, ids, nw: pk.routed_glu_adapter(  # noqa: E731
        x, wd, wg, wu, ids if experts > 1 else None, norm_weight=nw, backend=backend)
    definition = lambda *a: routed_glu_definition(*a)  # noqa: E731
    got, lowp, exact = run(op, dtype), run(definition, dtype), run(definition, torch.float64)
    for name, g, lp, ex in zip(["y", "dx", "dw_down", "dw_gate", "dw_up", "dnorm"], got, lowp, exact):
        assert g.dtype == dtype
        assert_matches_reference(g, lp, ex, atol=1e-2 if dtype in LOW_PRECISION else 0, what=name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_routed_glu_expert_without_tokens_gets_zero_gradient(backend):
    require_backend("routed_glu_adapter", backend)
    x, wd, wg, wu, _, nw = routed_inputs(9, experts=3)
    ids = torch.tensor([0, 2, 0, 2, 2, 0, 0, 2, 0])
    wd.requires_grad_()
    pk.routed_glu_adapter(x, wd, wg, wu, ids, norm_weight=nw, backend=backend).sum().backward()
    assert wd.grad[1].abs().max() == 0
    assert wd.grad[0].abs().max() > 0 and wd.grad[2].abs().max() > 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_routed_glu_gradcheck(backend):
    require_backend("routed_glu_adapter", backend)
    x, wd, wg, wu, ids, nw = routed_inputs(5, hidden=6, rank=3)
    args = [t.requires_grad_() for t in (x, wd, wg, wu, nw)]
    assert torch.autograd.gradcheck(lambda x, a, b, c, n: pk.routed_glu_adapter(x, a, b, c, ids, norm_weight=n,
                                                                                          backend=backend),
                                    args)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("experts,norm", [(1, False), (2, True)])
@pytest.mark.parametrize("save_uv", [False, True])
def test_routed_glu_opcheck(backend, experts, norm, save_uv):
    require_backend("routed_glu_adapter", backend)
    if save_uv and pk.dispatch.kernel("routed_glu_adapter", backend).forward_saving is None:
        pytest.skip(f"{backend} has no training pair for routed_glu_adapter")
    x, wd, wg, wu, ids, nw = routed_inputs(6, hidden=8, rank=3, experts=experts, norm=norm)
    args = [t.requires_grad_() if t is not None and t.is_floating_point() else t for t in (x, wd, wg, wu)]
    opcheck(torch.ops.pill_kernels.routed_glu_adapter.default,
            (*args, ids if experts > 1 else None, nw.requires_grad_() if nw is not None else None, 1e-6, backend,
             save_uv))


def test_routed_glu_leading_dims_and_bool_ids():
    x, wd, wg, wu, ids, nw = routed_inputs(12, norm=False)
    y = pk.routed_glu_adapter(x.view(3, 4, -1), wd, wg, wu, ids.bool().view(3, 4))
    torch.testing.assert_close(y.view(12, -1), ref.routed_glu_adapter(x, wd, wg, wu, ids))


# ------------------------------------------------------------------------------------------------------
# Soft-routed adapter (LaVIN)
# ------------------------------------------------------------------------------------------------------

def test_soft_routed_reference_equals_explicit_sum():
    a = soft_inputs()
    n = ref.rms_norm(a["x"], a["norm_weight"], 1e-6)
    z = (n @ a["w_down"] + a["b_down"]) * a["dropout_mask"]
    expected = n + 0.5 * sum(a["routing_weights"][:, e:e + 1] * (z @ a["w_up"][e] + a["b_up"][e]) for e in range(2))
    torch.testing.assert_close(ref.soft_routed_adapter(**a, eps=1e-6, scale=0.5), expected)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm,dropout", [(True, True), (False, False)])
def test_soft_routed_op_matches_reference_with_gradients(backend, dtype, norm, dropout):
    require_backend("soft_routed_adapter", backend)
    a = rounded_to(dtype, soft_inputs(norm=norm, dropout=dropout))
    names = [k for k, v in a.items() if v is not None and k != "dropout_mask"]
    grad_y = torch.randn_like(a["x"]).to(dtype).double()

    def run(fn, dt):
        args = {k: (v.to(dt) if v is not None else None) for k, v in a.items()}
        leaves = [args[k].requires_grad_() for k in names]
        y = fn(**args)
        return [y.detach()] + list(torch.autograd.grad(y, leaves, grad_y.to(dt)))

    op = lambda **kw: pk.soft_routed_adapter(**kw, scale=0.7, backend=backend)  # noqa: E731
    definition = lambda **kw: soft_routed_definition(**kw, scale=0.7)  # noqa: E731
    got, lowp, exact = run(op, dtype), run(definition, dtype), run(definition, torch.float64)
    for name, g, lp, ex in zip(["y"] + names, got, lowp, exact):
        assert_matches_reference(g, lp, ex, atol=1e-2 if dtype in LOW_PRECISION else 0, what=name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_soft_routed_gradcheck_and_opcheck(backend):
    require_backend("soft_routed_adapter", backend)
    a = soft_inputs(tokens=4, hidden=6, rank=2)
    keys = [k for k in a if k != "dropout_mask"]
    for k in keys:
        a[k].requires_grad_()

    def fn(*tensors):
        kw = dict(zip(keys, tensors))
        return pk.soft_routed_adapter(**kw, dropout_mask=a["dropout_mask"], scale=1.5, backend=backend)

    assert torch.autograd.gradcheck(fn, [a[k] for k in keys])
    opcheck(torch.ops.pill_kernels.soft_routed_adapter.default,
            (a["x"], a["w_down"], a["b_down"], a["w_up"], a["b_up"], a["routing_weights"], a["dropout_mask"],
             a["norm_weight"], 1e-6, 1.5, backend))


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


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask", MASK_KINDS)
def test_modality_gate_op_matches_reference_with_gradients(backend, dtype, mask):
    require_backend("modality_gate", backend)
    x, w, v = rounded_to(dtype, (torch.randn(17, 12, dtype=torch.float64),
                                 0.3 * torch.randn(12, 3, dtype=torch.float64),
                                 torch.randn(17, 3, 5, dtype=torch.float64)))
    image = image_mask(mask, 17)
    grad = torch.randn_like(v).to(dtype).double()

    def run(fn, dt):
        leaves = [t.to(dt).requires_grad_() for t in (x, w, v)]
        y = fn(*leaves, image)
        return [y.detach()] + list(torch.autograd.grad(y, leaves, grad.to(dt)))

    op = lambda *a: pk.modality_gate(*a, backend=backend)  # noqa: E731
    got, lowp, exact = (run(op, dtype), run(modality_gate_definition, dtype),
                        run(modality_gate_definition, torch.float64))
    for name, g, lp, ex in zip(["v_out", "dx", "dw_gate", "dv"], got, lowp, exact):
        assert_matches_reference(g, lp, ex, atol=1e-2 if dtype in LOW_PRECISION else 0, what=name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_modality_gate_gradcheck_and_opcheck(backend):
    require_backend("modality_gate", backend)
    x, w, v = [torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((5, 6), (6, 2), (5, 2, 3))]
    image = torch.tensor([True, False, True, True, False])
    assert torch.autograd.gradcheck(lambda a, b, c: pk.modality_gate(a, b, c, image, backend=backend), (x, w, v))
    opcheck(torch.ops.pill_kernels.modality_gate.default, (x, w, v, image, backend))


# ------------------------------------------------------------------------------------------------------
# Gated attention
# ------------------------------------------------------------------------------------------------------

def naive_gated_attention(q, k, v, gate_logits, image, padding, pk_, pv, pg, scale, window=None):
    """Loops over batch, head and query: the definition, written out (a window keeps the last `window` key
    positions up to the query's own)."""
    batch, heads, seq_q, _ = q.shape
    seq_k, group = k.shape[2], heads // k.shape[1]
    out = torch.zeros_like(q)
    for b in range(batch):
        for h in range(heads):
            for i in range(seq_q):
                pos = seq_k - seq_q + i
                first = 0 if window is None else max(pos - window + 1, 0)
                keys = [j for j in range(first, pos + 1) if padding is None or padding[b, j]]
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


@pytest.mark.parametrize("case", ["plain", "gate", "prompt", "gate_prompt_padding", "decode", "mha", "window",
                                  "window_gate_prompt_padding", "window_decode"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gated_attention_reference_and_op_equal_the_definition(backend, case):
    require_backend("gated_attention", backend)
    plain = case.removeprefix("window_")
    kw = dict(gate=plain in ("gate", "gate_prompt_padding", "decode"), prompt=plain in ("prompt",
              "gate_prompt_padding", "decode"), padding=plain in ("gate_prompt_padding", "decode"))
    if plain == "decode":
        kw.update(seq_q=1, seq_k=7)
    if plain == "mha":
        kw.update(kv_heads=4)
    a = attention_inputs(**kw)
    scale = 0.3
    window = 3 if case.startswith("window") else None
    expected = naive_gated_attention(a["q"], a["k"], a["v"], a["gate_logits"], a["image_mask"],
                                     a["key_padding_mask"], a["prompt_k"], a["prompt_v"], a["prompt_gate"], scale,
                                     window)
    torch.testing.assert_close(ref.gated_attention(**a, scale=scale, window=window), expected, rtol=1e-10,
                               atol=1e-10)
    torch.testing.assert_close(pk.gated_attention(**a, scale=scale, window=window, backend=backend), expected,
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_attention_op_gradients_match_reference(backend, dtype):
    require_backend("gated_attention", backend)
    a = rounded_to(dtype, attention_inputs())
    names = ["q", "k", "v", "gate_logits", "prompt_k", "prompt_v", "prompt_gate"]
    grad = torch.randn_like(a["q"]).to(dtype).double()

    def run(fn, dt):
        args = {k: (v.to(dt) if v is not None and v.is_floating_point() else v) for k, v in a.items()}
        leaves = [args[n].requires_grad_() for n in names]
        o = fn(**args)
        return [o.detach()] + list(torch.autograd.grad(o, leaves, grad.to(dt)))

    op = lambda **kw: pk.gated_attention(**kw, backend=backend)  # noqa: E731
    got, lowp, exact = (run(op, dtype), run(gated_attention_definition, dtype),
                        run(gated_attention_definition, torch.float64))
    for name, g, lp, ex in zip(["o"] + names, got, lowp, exact):
        assert_matches_reference(g, lp, ex, atol=2e-2 if dtype in LOW_PRECISION else 0, what=name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gated_attention_gradcheck_and_opcheck(backend):
    require_backend("gated_attention", backend)
    a = attention_inputs(batch=1, heads=2, kv_heads=1, seq_q=3, seq_k=3, head_dim=4, prompts=2)
    names = ["q", "k", "v", "gate_logits", "prompt_k", "prompt_v", "prompt_gate"]
    for n in names:
        a[n].requires_grad_()

    def fn(*tensors):
        kw = dict(a, **dict(zip(names, tensors)))
        return pk.gated_attention(**kw, backend=backend)

    assert torch.autograd.gradcheck(fn, [a[n] for n in names])
    opcheck(torch.ops.pill_kernels.gated_attention.default,
            (a["q"], a["k"], a["v"], a["gate_logits"], a["image_mask"], a["key_padding_mask"], a["prompt_k"],
             a["prompt_v"], a["prompt_gate"], None, None, True, 0.5, 0, backend))
    segments, prompt_segments = torch.tensor([[0, 0, 1]], dtype=torch.int32), torch.tensor([[0, 1]], dtype=torch.int32)
    opcheck(torch.ops.pill_kernels.gated_attention.default,
            (a["q"], a["k"], a["v"], a["gate_logits"], a["image_mask"], None, a["prompt_k"], a["prompt_v"],
             a["prompt_gate"], segments, prompt_segments, True, 0.5, 2, backend))

    def windowed(*tensors):
        return pk.gated_attention(**dict(a, **dict(zip(names, tensors))), window=2, backend=backend)

    assert torch.autograd.gradcheck(windowed, [a[n] for n in names])


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gated_attention_on_packed_rows_equals_each_segment_alone(backend, window):
    """Packed rows (segment_ids; prompts assigned to segments): the output and every gradient equal the
    definition run on each segment alone, with that segment's prompts (none: no prompt branch). Segments span
    several of the interpreter's 16-key blocks, start mid-block and end a row with padding (id -1); with a
    sliding window, each segment alone has the same window."""
    require_backend("gated_attention", backend)
    batch, heads, kv_heads, seq, head_dim, prompts = 2, 4, 2, 45, 8, 6
    a = attention_inputs(batch=batch, heads=heads, kv_heads=kv_heads, seq_q=seq, seq_k=seq, head_dim=head_dim,
                         prompts=prompts, padding=False)
    segments = torch.tensor([[0] * 10 + [1] * 23 + [2] * 7 + [-1] * 5, [5] + [6] * 17 + [7] * 27])
    prompt_segments = torch.tensor([[0, 0, 1, 1, 2, 2], [5, 5, 7, 7, 9, 9]])  # example 6 has none
    names = ["q", "k", "v", "gate_logits", "prompt_k", "prompt_v", "prompt_gate"]
    grad = torch.randn_like(a["q"])
    leaves = {n: a[n].clone().requires_grad_() for n in names}
    out = pk.gated_attention(**dict(a, **leaves), segment_ids=segments, prompt_segment_ids=prompt_segments,
                             window=window, backend=backend)
    got = [out] + list(torch.autograd.grad(out, list(leaves.values()), grad))

    ref_leaves = {n: a[n].clone().requires_grad_() for n in names}
    expected_out = torch.zeros_like(a["q"])
    for b in range(batch):
        for segment in segments[b].unique():
            keys = (segments[b] == segment).nonzero().flatten()
            lo, hi = int(keys.min()), int(keys.max()) + 1
            own = prompt_segments[b] == segment
            cut = lambda name: ref_leaves[name][b:b + 1, :, lo:hi]  # noqa: E731
            kw = dict(gate_logits=cut("gate_logits"), image_mask=a["image_mask"][b:b + 1, lo:hi], window=window)
            if own.any():
                kw.update(prompt_k=ref_leaves["prompt_k"][b:b + 1, :, own],
                          prompt_v=ref_leaves["prompt_v"][b:b + 1, :, own], prompt_gate=ref_leaves["prompt_gate"])
            expected_out[b, :, lo:hi] = gated_attention_definition(cut("q"), cut("k"), cut("v"), **kw)[0]
    expected = [expected_out] + list(torch.autograd.grad(expected_out, list(ref_leaves.values()), grad))
    for name, g, e in zip(["o"] + names, got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")


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
    a = attention_inputs()
    with pytest.raises(pk.BackendUnavailableError,
                       match="backend 'cuda' is not available for op 'gated_attention'.*pip install"):
        pk.gated_attention(a["q"], a["k"], a["v"], backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        pk.gated_attention(a["q"], a["k"], a["v"], backend="fast")
    chosen, why = pk.explain("gated_attention", "cpu")
    assert chosen == "eager" and "cuda: not built" in why
    with pk.use_backend("cuda"):
        assert pk.get_backend() == "cuda"
        with pytest.raises(pk.BackendUnavailableError):
            pk.gated_attention(a["q"], a["k"], a["v"])
    assert pk.get_backend() == "auto"


def test_auto_skips_backends_that_run_but_should_not_be_picked(monkeypatch):
    monkeypatch.setattr(pk.dispatch, "_registry", {})
    forward = lambda: "forward"  # noqa: E731
    pk.dispatch.register("toy", "eager", forward, forward)
    pk.dispatch.register("toy", "triton", forward, forward, auto_skip_reason=lambda d: "interpreted on cpu")
    pk.dispatch.register("toy", "cuda", forward, forward, unavailable_reason=lambda d: f"no kernels for {d.type}")
    chosen, why = pk.explain("toy", "cpu")
    assert chosen == "eager"
    assert why == "auto: cuda: no kernels for cpu; triton: interpreted on cpu; cpp: not built; eager: chosen"
    assert pk.explain("toy", "cpu", "triton") == ("triton", "asked for by name")
    with pytest.raises(pk.BackendUnavailableError, match="backend 'cuda' cannot run op 'toy' on cpu: no kernels"):
        pk.explain("toy", "cpu", "cuda")
    assert pk.available_backends("toy", "cpu") == ["eager", "triton"]
    with pytest.raises(ValueError, match="toy/cpp: forward_saving and backward_from_saved go together"):
        pk.dispatch.register("toy", "cpp", forward, forward, forward_saving=forward)


# Backends that CI (a CPU machine with triton installed and the C++ extension built) must be able to test; a
# missing one would otherwise only show up as skipped tests.
EXPECTED_CPU_BACKENDS_IN_CI = {
    "routed_glu_adapter": ["eager", "triton", "cpp"],
    "soft_routed_adapter": ["eager", "triton", "cpp"],
    "modality_gate": ["eager", "triton", "cpp"],
    "gated_attention": ["eager", "triton"],
}


def test_backends_expected_in_ci():
    if os.environ.get("CI") != "true":
        pytest.skip("only CI promises which backends are built")
    for op, expected in EXPECTED_CPU_BACKENDS_IN_CI.items():
        missing = sorted(set(expected) - set(pk.available_backends(op, "cpu")))
        assert not missing, f"{op}: backends {missing} should be testable on CPU in CI: {pk.explain(op, 'cpu')}"


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


def test_routed_glu_reference_runs_under_bf16_autocast():
    x, wd, wg, wu, ids, nw = (t.float() if t.is_floating_point() else t for t in routed_inputs(9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = pk.routed_glu_adapter(x, wd, wg, wu, ids, norm_weight=nw, backend="eager")
    torch.testing.assert_close(y, ref.routed_glu_adapter(x, wd, wg, wu, ids, nw), rtol=0.05, atol=0.05)


def _toy_measured_registry(monkeypatch, tmp_path, entries):
    """A toy op on a pretend GPU named "Toy GPU", with a measured-only "triton" and a measurements file."""
    monkeypatch.setattr(pk.dispatch, "_registry", {})
    monkeypatch.setattr(pk.dispatch, "_measurements_cache", {})
    monkeypatch.setitem(pk.dispatch.SHAPE_FEATURES, "toy", (("pass", "dtype"), ("tokens", "hidden")))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Toy GPU")
    forward = lambda: None  # noqa: E731
    pk.dispatch.register("toy", "eager", forward, forward)
    pk.dispatch.register("toy", "triton", forward, forward, auto_needs_measurement=True)
    path = tmp_path / "measurements.json"
    path.write_text(json.dumps({"_comment": "test", "toy": {"Toy GPU": entries}}))
    monkeypatch.setenv("PILL_KERNELS_MEASUREMENTS", str(path))
    return path


def test_auto_takes_a_measured_only_backend_exactly_where_measured_fastest(monkeypatch, tmp_path):
    base = {"pass": "forward_backward", "dtype": "torch.bfloat16", "hidden": 4096}
    _toy_measured_registry(monkeypatch, tmp_path, [
        dict(base, tokens=4096, median_ms={"eager": 2.0, "triton": 1.0}),
        dict(base, tokens=65536, median_ms={"eager": 9.0, "triton": 12.0}),
        dict(base, tokens=4096, dtype="torch.float16", median_ms={"eager": 1.0, "triton": 3.0}),
    ])
    call = dict(base, tokens=3000)
    chosen, why = pk.explain("toy", "cuda", shape=call)
    assert chosen == "triton"
    assert "measured fastest (1 ms) on Toy GPU" in why and "tokens=4096" in why and "measurements.json" in why
    assert pk.explain("toy", "cuda", shape=dict(call, tokens=50000))[0] == "eager"      # eager measured faster
    assert pk.explain("toy", "cuda", shape=dict(call, dtype="torch.float16"))[0] == "eager"
    # Nothing measured near: more than 4x from every record, another pass, another GPU, no shape at all.
    for shape in (dict(call, tokens=512), dict(call, hidden=576), dict(call, **{"pass": "forward"}), None):
        chosen, why = pk.explain("toy", "cuda", shape=shape)
        assert chosen == "eager" and "triton: auto uses triton for toy only where measured fastest" in why
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Other GPU")
    assert pk.explain("toy", "cuda", shape=call)[0] == "eager"
    # By name it always runs; on CPU auto never consults GPU measurements.
    assert pk.explain("toy", "cuda", "triton", shape=dict(call, tokens=512)) == ("triton", "asked for by name")
    assert pk.explain("toy", "cpu", shape=call)[0] == "eager"


def test_auto_measurements_file_errors_name_the_file(monkeypatch, tmp_path):
    path = _toy_measured_registry(monkeypatch, tmp_path, [])
    path.write_text("{not json")
    with pytest.raises(ValueError, match="measurements file .*measurements.json is not valid JSON"):
        pk.explain("toy", "cuda", shape={"pass": "forward", "dtype": "x", "tokens": 1, "hidden": 1})
    monkeypatch.setenv("PILL_KERNELS_MEASUREMENTS", str(tmp_path / "missing.json"))
    with pytest.raises(FileNotFoundError, match="PILL_KERNELS_MEASUREMENTS: no file .*missing.json"):
        pk.explain("toy", "cuda", shape={"pass": "forward", "dtype": "x", "tokens": 1, "hidden": 1})


def test_ops_describe_their_call_to_auto(monkeypatch):
    """What each public op tells dispatch about the call: the features measurements are keyed by."""
    seen = {}
    real = pk.dispatch.resolve

    def spy(op, device, backend=None, shape=None):
        seen[op] = shape
        return real(op, device, backend, shape)

    monkeypatch.setattr(pk.dispatch, "resolve", spy)
    for op, features in pk.dispatch.SHAPE_FEATURES.items():
        assert set(sum(features, ())) >= {"pass", "dtype"}, op
    a = attention_inputs()
    pk.gated_attention(a["q"], a["k"], a["v"], gate_logits=a["gate_logits"].requires_grad_(),
                       image_mask=a["image_mask"])
    batch, heads, seq, head_dim = a["q"].shape
    assert seen["gated_attention"] == {"pass": "forward_backward", "dtype": str(a["q"].dtype), "variant": "gate",
                                       "batch": batch, "seq": seq, "heads": heads, "head_dim": head_dim}
    with torch.no_grad():
        pk.gated_attention(a["q"], a["k"], a["v"], prompt_k=a["prompt_k"], prompt_v=a["prompt_v"],
                           prompt_gate=a["prompt_gate"])
    assert seen["gated_attention"]["variant"] == "prompt" and seen["gated_attention"]["pass"] == "forward"
    x, wd, wg, wu, ids, nw = routed_inputs(8, norm=True)
    pk.routed_glu_adapter(x, wd, wg, wu, ids, norm_weight=nw)
    assert seen["routed_glu_adapter"] == {"pass": "forward", "dtype": str(x.dtype), "tokens": 8,
                                          "hidden": x.shape[-1], "rank": wd.shape[-1]}
    for op, shape in seen.items():
        exact, near = pk.dispatch.SHAPE_FEATURES[op]
        assert set(shape) == set(exact + near), op


def test_custom_ops_eager_kernels_gradcheck():
    """The public functions run "eager" as the reference under autograd; the custom ops' own eager kernels
    (forward without autograd, recomputed vector-Jacobian product) serve torch.ops callers and must stay right."""
    ops = torch.ops.pill_kernels
    x, wd, wg, wu, ids, nw = routed_inputs(5, hidden=6, rank=3)
    assert torch.autograd.gradcheck(
        lambda *t: ops.routed_glu_adapter.default(*t[:4], ids, t[4], 1e-6, "eager", False)[0],
        [t.requires_grad_() for t in (x, wd, wg, wu, nw)])
    s = soft_inputs(tokens=4, hidden=6, rank=3)
    names = ["x", "w_down", "b_down", "w_up", "b_up", "routing_weights"]
    assert torch.autograd.gradcheck(
        lambda *t: ops.soft_routed_adapter.default(*t, s["dropout_mask"], s["norm_weight"], 1e-6, 0.5, "eager"),
        [s[n].requires_grad_() for n in names])
    v = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    wgate = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, c: ops.modality_gate.default(a, b, c, ids.bool(), "eager"), [x, wgate, v])
    a = attention_inputs(batch=1, heads=2, kv_heads=1, seq_q=3, seq_k=3, head_dim=4, prompts=2)
    names = ["q", "k", "v", "gate_logits", "prompt_k", "prompt_v", "prompt_gate"]
    assert torch.autograd.gradcheck(
        lambda q, k, v, g, pk_, pv, pg: ops.gated_attention.default(
            q, k, v, g, a["image_mask"], a["key_padding_mask"], pk_, pv, pg, None, None, True, 0.5, 2, "eager")[0],
        [a[n].requires_grad_() for n in names])
