"""The C++ CPU kernels (pill_kernels_C ops, the "cpp" backend) beyond the shared op tests of test_ops.py: the
shape and mask matrix of docs/correctness.md under every instruction-set variant of the micro-kernels this CPU
runs, the C++ input checks, determinism and independence from the thread count, and the package without the
extension."""
import dataclasses
import subprocess
import sys

import pytest
import torch

import pill_kernels as pk
from pill_kernels import reference as ref

from op_testing import LOW_PRECISION, MASK_KINDS, assert_matches_reference, image_mask, routed_inputs, soft_inputs

pytestmark = pytest.mark.skipif("cpp" not in pk.available_backends("routed_glu_adapter", "cpu"),
                                reason=f"the C++ extension is not built: {pk.extension_info()}")
C = torch.ops.pill_kernels_C
ISAS = ["generic", "avx2", "avx512", "avx512bf16"]


def use_isa(monkeypatch, name):
    """Selects the micro-kernels of one instruction set for the rest of the test; skips where the CPU lacks it."""
    monkeypatch.setenv("PILL_KERNELS_CPU_ISA", name)
    x, wd, wg, wu, ids, _ = routed_inputs(1, experts=1, norm=False)
    try:
        C.routed_glu_adapter_forward(x, wd, wg, wu, None, None, 1e-6)
    except RuntimeError as exc:
        if "supports at most" in str(exc):
            pytest.skip(str(exc))
        raise
    return name


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    """Runs the test with the micro-kernels of one instruction set (skipped where the CPU lacks it)."""
    return use_isa(monkeypatch, request.param)


def reference_with_grads(fn, grad_out, tensors):
    """fn(*tensors) and its gradient with respect to every floating tensor (None where a tensor is None)."""
    leaves = [t.detach().requires_grad_() if t is not None and t.is_floating_point() else t for t in tensors]
    out = fn(*leaves)
    wrt = [t for t in leaves if t is not None and t.is_floating_point()]
    grads = iter(torch.autograd.grad(out, wrt, grad_out))
    return out.detach(), [next(grads) if t is not None and t.is_floating_point() else None for t in leaves]


def assert_all_close(got, expected, what):
    # Whole tensors: an unwritten element (empty_like garbage) fails as surely as a wrong one.
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10, msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------------------------------------------------------
# Routed GLU adapter
# ------------------------------------------------------------------------------------------------------

def routed_case(tokens, hidden, rank, experts, mask, norm):
    x, wd, wg, wu, ids, nw = routed_inputs(tokens, hidden=hidden, rank=rank, experts=experts, norm=norm, mask=mask)
    if mask == "empty_expert":  # the middle expert of three gets no token
        ids = torch.randint(0, 2, (tokens,)) * 2
    return x, wd, wg, wu, ids, nw


def check_routed(x, wd, wg, wu, ids, nw):
    grad_y = torch.randn_like(x)
    y_ref, grads_ref = reference_with_grads(lambda *a: ref.routed_glu_adapter(*a, 1e-6), grad_y,
                                            (x, wd, wg, wu, ids, nw))
    y = C.routed_glu_adapter_forward(x, wd, wg, wu, ids, nw, 1e-6)
    dx, dwd, dwg, dwu, dnw = C.routed_glu_adapter_backward(grad_y, x, wd, wg, wu, ids, nw, 1e-6)
    assert_all_close(y, y_ref, "y")
    for name, got, expected in zip(["dx", "dw_down", "dw_gate", "dw_up"], [dx, dwd, dwg, dwu], grads_ref[:4]):
        assert_all_close(got, expected, name)
    if nw is None:
        assert dnw.numel() == 0
    else:
        assert_all_close(dnw, grads_ref[5], "dnorm_weight")
    # The training pair: the forward also returns u = n W_down and v = n W_gate per token (here from an einsum
    # over each token's own expert), and the backward that reads them gives the reference's gradients.
    y_saving, uv = C.routed_glu_adapter_forward_saving(x, wd, wg, wu, ids, nw, 1e-6)
    assert_all_close(y_saving, y_ref, "y (forward_saving)")
    n = ref.rms_norm(x, nw, 1e-6) if nw is not None else x
    expert = ids if ids is not None else torch.zeros(x.shape[0], dtype=torch.long)
    uv_expected = torch.cat([torch.einsum("td,tdr->tr", n, wd[expert]), torch.einsum("td,tdr->tr", n, wg[expert])],
                            dim=1)
    assert_all_close(uv, uv_expected, "uv")
    saved = C.routed_glu_adapter_backward_from_saved(grad_y, uv, x, wd, wg, wu, ids, nw, 1e-6)
    for name, got, expected in zip(["dx", "dw_down", "dw_gate", "dw_up"], saved[:4], grads_ref[:4]):
        assert_all_close(got, expected, f"{name} (backward_from_saved)")
    if nw is not None:
        assert_all_close(saved[4], grads_ref[5], "dnorm_weight (backward_from_saved)")


def test_routed_glu_trains_through_the_saving_pair_only_when_a_gradient_is_needed(monkeypatch):
    """With a gradient to compute the public function keeps u and v (forward_saving) and the backward reads them
    (backward_from_saved); without one (no_grad, or no input that requires grad) nothing extra is kept."""
    kernel = pk.dispatch.kernel("routed_glu_adapter", "cpp")
    calls = []

    def recording(name):
        function = getattr(kernel, name)
        return lambda *args: calls.append(name) or function(*args)

    names = ["forward", "backward", "forward_saving", "backward_from_saved"]
    monkeypatch.setitem(pk.dispatch._registry["routed_glu_adapter"], "cpp",
                        dataclasses.replace(kernel, **{name: recording(name) for name in names}))
    x, wd, wg, wu, ids, nw = routed_case(9, 40, 5, 2, "random", norm=True)
    wd.requires_grad_()
    pk.routed_glu_adapter(x, wd, wg, wu, ids, norm_weight=nw, backend="cpp").sum().backward()
    assert calls == ["forward_saving", "backward_from_saved"] and wd.grad.abs().max() > 0
    calls.clear()
    with torch.no_grad():
        pk.routed_glu_adapter(x, wd, wg, wu, ids, norm_weight=nw, backend="cpp")
    pk.routed_glu_adapter(x, wd.detach(), wg, wu, ids, norm_weight=nw, backend="cpp")
    assert calls == ["forward", "forward"]


@pytest.mark.parametrize("tokens", [1, 2, 33, 97])
@pytest.mark.parametrize("mask", MASK_KINDS + ["empty_expert"])
def test_routed_glu_mask_matrix(isa, tokens, mask):
    experts = 3 if mask == "empty_expert" else 2
    check_routed(*routed_case(tokens, 37, 5, experts, mask, norm=True))


@pytest.mark.parametrize("hidden,rank", [(37, 33), (70, 1), (64, 32), (129, 17)])
@pytest.mark.parametrize("norm", [False, True])
def test_routed_glu_shapes(isa, hidden, rank, norm):
    check_routed(*routed_case(45, hidden, rank, 2, "random", norm))


def test_routed_glu_single_expert_without_ids_and_many_chunks(isa):
    # 700 tokens: several chunks per expert, so the chunked weight-gradient reduction is exercised.
    x, wd, wg, wu, _, nw = routed_case(700, 40, 6, 1, "random", norm=True)
    check_routed(x, wd, wg, wu, None, nw)
    check_routed(*routed_case(1100, 24, 3, 2, "random", norm=True))


# ------------------------------------------------------------------------------------------------------
# Soft-routed adapter
# ------------------------------------------------------------------------------------------------------

def check_soft(a, scale=0.7):
    keys = ["x", "w_down", "b_down", "w_up", "b_up", "routing_weights", "dropout_mask", "norm_weight"]
    tensors = [a[k] for k in keys]
    grad_y = torch.randn_like(a["x"])
    fn = lambda *t: ref.soft_routed_adapter(*t, eps=1e-6, scale=scale)  # noqa: E731
    y_ref, grads_ref = reference_with_grads(fn, grad_y, tensors)
    y = C.soft_routed_adapter_forward(*tensors, 1e-6, scale)
    grads = C.soft_routed_adapter_backward(grad_y, *tensors, 1e-6, scale)
    assert_all_close(y, y_ref, "y")
    expected = grads_ref[:6] + grads_ref[7:]
    for name, got, exp in zip(["dx", "dw_down", "db_down", "dw_up", "db_up", "drouting_weights", "dnorm_weight"],
                              grads, expected):
        if exp is None:
            assert got.numel() == 0, name
        else:
            assert_all_close(got, exp, name)


@pytest.mark.parametrize("tokens", [1, 7, 33, 600])
@pytest.mark.parametrize("norm,dropout", [(True, True), (False, False), (True, False)])
def test_soft_routed_matrix(isa, tokens, norm, dropout):
    check_soft(soft_inputs(tokens=tokens, hidden=37, rank=5, experts=3, norm=norm, dropout=dropout))


@pytest.mark.parametrize("hidden,rank,experts", [(70, 33, 2), (64, 32, 1), (24, 1, 4)])
def test_soft_routed_shapes(isa, hidden, rank, experts):
    check_soft(soft_inputs(tokens=41, hidden=hidden, rank=rank, experts=experts), scale=1.3)


# ------------------------------------------------------------------------------------------------------
# Modality gate
# ------------------------------------------------------------------------------------------------------

def check_gate(tokens, hidden, heads, head_dim, mask):
    x = torch.randn(tokens, hidden, dtype=torch.float64)
    w = 0.3 * torch.randn(hidden, heads, dtype=torch.float64)
    v = torch.randn(tokens, heads, head_dim, dtype=torch.float64)
    image = image_mask(mask, tokens)
    grad_v = torch.randn_like(v)
    out_ref, grads_ref = reference_with_grads(ref.modality_gate, grad_v, (x, w, v, image))
    assert_all_close(C.modality_gate_forward(x, w, v, image), out_ref, "v_out")
    for name, got, expected in zip(["dx", "dw_gate", "dv"], C.modality_gate_backward(grad_v, x, w, v, image),
                                   grads_ref[:3]):
        assert_all_close(got, expected, name)


@pytest.mark.parametrize("tokens", [1, 2, 33, 700])
@pytest.mark.parametrize("mask", MASK_KINDS)
def test_modality_gate_mask_matrix(isa, tokens, mask):
    check_gate(tokens, 37, 3, 5, mask)


@pytest.mark.parametrize("hidden,heads,head_dim", [(64, 8, 16), (45, 33, 3), (16, 1, 1)])
def test_modality_gate_shapes(isa, hidden, heads, head_dim):
    check_gate(29, hidden, heads, head_dim, "random")


# ------------------------------------------------------------------------------------------------------
# Low precision on shapes where rounding shows (the shared tests use tiny ones)
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_routed_glu_follows_the_two_x_rule(isa, dtype):
    """Under avx512bf16, bf16 runs the bf16 products (cpu_gemm.h); under the others, and for fp16, fp32 products."""
    inputs = routed_case(200, 256, 32, 2, "random", norm=True)
    grad_y = torch.randn_like(inputs[0])
    cast = lambda ts, dt: [t.to(dt) if t is not None and t.is_floating_point() else t for t in ts]  # noqa: E731
    fn = lambda *a: ref.routed_glu_adapter(*a, 1e-6)  # noqa: E731
    y64, g64 = reference_with_grads(fn, grad_y, inputs)
    ylp, glp = reference_with_grads(fn, grad_y.to(dtype), cast(inputs, dtype))
    args = cast(inputs, dtype)
    y = C.routed_glu_adapter_forward(*args, 1e-6)
    grads = C.routed_glu_adapter_backward(grad_y.to(dtype), *args, 1e-6)
    assert_matches_reference(y, ylp, y64, atol=1e-2, what="y")
    for name, got, lp, ex in zip(["dx", "dw_down", "dw_gate", "dw_up", "dnorm"], grads, glp[:4] + glp[5:],
                                 g64[:4] + g64[5:]):
        assert got.dtype == dtype
        assert_matches_reference(got, lp, ex, atol=1e-2, what=name)
    # The training pair keeps u and v in fp32, unrounded: its backward is the recomputing one, bit for bit.
    y_saving, uv = C.routed_glu_adapter_forward_saving(*args, 1e-6)
    assert uv.dtype == torch.float32 and torch.equal(y_saving, y)
    saved = C.routed_glu_adapter_backward_from_saved(grad_y.to(dtype), uv, *args, 1e-6)
    assert all(torch.equal(a, b) for a, b in zip(saved, grads))


def bf16(t):
    return t.to(torch.bfloat16).double()


def bf16_products_emulation(x, wd, wg, wu, ids, nw, gy, eps):
    """float64 model of the routed adapter with bf16 products: every product's operands are bf16 values (n, x,
    grad_y exactly; the GLU output a and du, dv rounded once), sums exact, outputs rounded to bf16. Per token with
    its own expert's weights (einsum over gathered matrices), the norm's backward written out by hand."""
    x, wd, wg, wu, gy = (t.double() for t in (x, wd, wg, wu, gy))
    if nw is not None:
        nw = nw.double()
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        xr = bf16(x * rstd)
        n = bf16(nw * xr)
    else:
        n = x
    u = torch.einsum("td,tdr->tr", n, wd[ids])
    v = torch.einsum("td,tdr->tr", n, wg[ids])
    sig = torch.sigmoid(v)
    a = bf16(v * sig * u)
    y = bf16(n + torch.einsum("tr,trd->td", a, wu[ids]))
    da = torch.einsum("td,trd->tr", gy, wu[ids])
    du, dv = bf16(da * v * sig), bf16(da * u * sig * (1 + v * (1 - sig)))
    onehot = torch.nn.functional.one_hot(ids, wd.shape[0]).double()  # [T, E]: sums per expert
    dwd = bf16(torch.einsum("te,td,tr->edr", onehot, n, du))
    dwg = bf16(torch.einsum("te,td,tr->edr", onehot, n, dv))
    dwu = bf16(torch.einsum("te,tr,td->erd", onehot, a, gy))
    dn = gy + torch.einsum("tr,tdr->td", du, wd[ids]) + torch.einsum("tr,tdr->td", dv, wg[ids])
    if nw is None:
        return y, (bf16(dn), dwd, dwg, dwu)
    mean_dot = (dn * nw * xr).mean(-1, keepdim=True)
    dx = bf16(rstd * (dn * nw - xr * mean_dot))
    return y, (dx, dwd, dwg, dwu, bf16((dn * xr).sum(0)))


@pytest.mark.parametrize("tokens,hidden,rank,norm", [(203, 96, 16, True), (33, 40, 5, True), (1, 40, 5, True),
                                                     (97, 48, 20, False)])
def test_bf16_products_round_what_they_multiply_once(monkeypatch, tokens, hidden, rank, norm):
    """bf16 inputs under avx512bf16 (vdpbf16ps products, fp32 sums) against a float64 model of the same
    roundings: outputs equal but for the last bit of the few sums that fp32 leaves on the other side of a bf16
    rounding boundary. The fp32 products (avx512) keep a, du, dv unrounded and miss the model by far more."""
    use_isa(monkeypatch, "avx512bf16")
    torch.manual_seed(3)
    x, wd, wg, wu, ids, nw = [t.to(torch.bfloat16) if t is not None and t.is_floating_point() else t
                              for t in routed_case(tokens, hidden, rank, 2, "random", norm=norm)]
    gy = torch.randn_like(x)
    y = C.routed_glu_adapter_forward(x, wd, wg, wu, ids, nw, 1e-6)
    y_model, grads_model = bf16_products_emulation(x, wd, wg, wu, ids, nw, gy, 1e-6)

    def mismatches(got, expected):
        assert got.dtype == torch.bfloat16 and got.shape == expected.shape
        got = got.double()
        ulp = torch.ldexp(torch.ones_like(expected), torch.frexp(expected)[1] - 8)  # bf16's spacing at |expected|
        assert ((got - expected).abs() <= ulp).all(), f"off by more than one bf16 ulp: {(got - expected).abs().max()}"
        return (got != expected).double().mean().item()

    grads = C.routed_glu_adapter_backward(gy, x, wd, wg, wu, ids, nw, 1e-6)
    grads = grads if norm else grads[:4]
    rates = {name: mismatches(got, expected)
             for name, got, expected in zip(["y", "dx", "dw_down", "dw_gate", "dw_up", "dnorm"], [y, *grads],
                                            [y_model, *grads_model])}
    assert all(rate <= 0.005 for rate in rates.values()), rates
    if tokens > 90:  # The same inputs through the fp32 products: the model of bf16 products does not describe them.
        monkeypatch.setenv("PILL_KERNELS_CPU_ISA", "avx512")
        fp32_grads = C.routed_glu_adapter_backward(gy, x, wd, wg, wu, ids, nw, 1e-6)
        assert (fp32_grads[3].double() != grads_model[3]).double().mean().item() > 0.2


# ------------------------------------------------------------------------------------------------------
# Determinism and thread count
# ------------------------------------------------------------------------------------------------------

def all_backward_outputs(dtype=torch.float32):
    x, wd, wg, wu, ids, nw = [t.to(dtype) if t is not None and t.is_floating_point() else t
                              for t in routed_case(1500, 96, 32, 2, "random", norm=True)]
    gy = torch.randn_like(x)
    s = {k: (v.to(dtype) if v is not None else None) for k, v in soft_inputs(tokens=1500, hidden=96, rank=8).items()}
    xs = s.pop("x")
    v = torch.randn(1500, 4, 8, dtype=dtype)
    wgate = torch.randn(96, 4, dtype=dtype)
    image = torch.rand(1500) < 0.5
    return [*C.routed_glu_adapter_backward(gy, x, wd, wg, wu, ids, nw, 1e-6),
            *C.soft_routed_adapter_backward(gy, xs, *s.values(), 1e-6, 0.5),
            *C.modality_gate_backward(torch.randn_like(v), x, wgate, v, image)]


def run_seeded(seed, threads=None):
    previous = torch.get_num_threads()
    torch.manual_seed(seed)
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return all_backward_outputs()
    finally:
        torch.set_num_threads(previous)


def test_backward_is_bitwise_deterministic():
    first, second = run_seeded(1234), run_seeded(1234)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.skipif(not sys.platform.startswith("linux") or "OpenMP" not in torch.__config__.parallel_info(),
                    reason="the OpenMP build is for Linux with torch's OpenMP backend")
def test_kernels_are_built_to_use_torchs_threads():
    """at::parallel_for compiles to a serial loop without -fopenmp: the kernels must be built with it."""
    assert "parallel over torch's OpenMP threads" in torch.ops.pill_kernels_C.build_info()


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs a machine where torch runs more than one thread")
def test_multithreaded_equals_single_threaded():
    many, one = run_seeded(99, threads=torch.get_num_threads()), run_seeded(99, threads=1)
    for a, b in zip(many, one):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------------
# C++ input checks (the ops called directly, bypassing the Python validation)
# ------------------------------------------------------------------------------------------------------

def test_routed_glu_checks():
    x, wd, wg, wu, ids, nw = routed_case(6, 40, 5, 2, "random", norm=True)
    f = C.routed_glu_adapter_forward
    with pytest.raises(RuntimeError, match="x must be float16, bfloat16, float32 or float64, got Long"):
        f(x.long(), wd, wg, wu, ids, nw, 1e-6)
    with pytest.raises(RuntimeError, match="w_gate has dtype Float but x has Double"):
        f(x, wd, wg.float(), wu, ids, nw, 1e-6)
    with pytest.raises(RuntimeError, match=r"w_up must have shape \[E, r, D\] = \[2, 5, 40\], got \[2, 5, 39\]"):
        f(x, wd, wg, wu[:, :, :-1].contiguous(), ids, nw, 1e-6)
    with pytest.raises(RuntimeError, match="w_down must be contiguous"):
        f(x, wd.transpose(1, 2).contiguous().transpose(1, 2), wg, wu, ids, nw, 1e-6)
    with pytest.raises(RuntimeError, match=r"expert_ids must lie in \[0, 2\) for E=2 experts, got 2 at token 3"):
        f(x, wd, wg, wu, torch.tensor([0, 1, 0, 2, 0, 1]), nw, 1e-6)
    with pytest.raises(RuntimeError, match=r"expert_ids must lie in \[0, 2\).*got -1"):
        f(x, wd, wg, wu, torch.tensor([0, 1, 0, -1, 0, 1]), nw, 1e-6)
    with pytest.raises(RuntimeError, match="expert_ids must be int64, got Int"):
        f(x, wd, wg, wu, ids.int(), nw, 1e-6)
    with pytest.raises(RuntimeError, match=r"expert_ids must have shape \[T\]"):
        f(x, wd, wg, wu, ids[:5], nw, 1e-6)
    with pytest.raises(RuntimeError, match="expert_ids is required when there are E=2 experts"):
        f(x, wd, wg, wu, None, nw, 1e-6)
    with pytest.raises(RuntimeError, match=r"norm_weight must have shape \[D\]"):
        f(x, wd, wg, wu, ids, nw[:-1], 1e-6)
    with pytest.raises(RuntimeError, match=r"x must have shape \[T, D\]"):
        f(x[None], wd, wg, wu, ids, nw, 1e-6)
    with pytest.raises(RuntimeError, match=r"grad_y must have shape x.shape"):
        C.routed_glu_adapter_backward(x[:5], x, wd, wg, wu, ids, nw, 1e-6)
    with pytest.raises(RuntimeError, match="grad_y has dtype Float but x has Double"):
        C.routed_glu_adapter_backward(x.float(), x, wd, wg, wu, ids, nw, 1e-6)
    _, uv = C.routed_glu_adapter_forward_saving(x, wd, wg, wu, ids, nw, 1e-6)
    saved = C.routed_glu_adapter_backward_from_saved
    with pytest.raises(RuntimeError, match=r"uv must have shape \[T, 2r\] = \[6, 10\], got \[6, 9\]"):
        saved(x, uv[:, :-1].contiguous(), x, wd, wg, wu, ids, nw, 1e-6)
    with pytest.raises(RuntimeError, match="uv must have dtype Double for x of dtype Double, got Float"):
        saved(x, uv.float(), x, wd, wg, wu, ids, nw, 1e-6)
    with pytest.raises(RuntimeError, match="uv must be a contiguous CPU tensor"):
        saved(x, uv.t().contiguous().t(), x, wd, wg, wu, ids, nw, 1e-6)


def test_soft_routed_checks():
    a = soft_inputs()
    keys = ["x", "w_down", "b_down", "w_up", "b_up", "routing_weights", "dropout_mask", "norm_weight"]

    def call(**override):
        args = [override.get(k, a[k]) for k in keys]
        return C.soft_routed_adapter_forward(*args, 1e-6, 1.0)

    with pytest.raises(RuntimeError, match=r"b_down must have shape \[r\] = \[4\], got \[3\]"):
        call(b_down=a["b_down"][:3])
    with pytest.raises(RuntimeError, match=r"routing_weights must have shape \[T, E\] = \[9, 2\]"):
        call(routing_weights=a["routing_weights"][:, :1].contiguous())
    with pytest.raises(RuntimeError, match=r"dropout_mask must have shape \[T, r\]"):
        call(dropout_mask=a["dropout_mask"][:, :3].contiguous())
    with pytest.raises(RuntimeError, match="dropout_mask has dtype Float but x has Double"):
        call(dropout_mask=a["dropout_mask"].float())
    with pytest.raises(RuntimeError, match="b_up must be contiguous"):
        call(b_up=a["b_up"].t().contiguous().t())
    with pytest.raises(RuntimeError, match=r"w_up must have shape \[E, r, D\]"):
        call(w_up=a["w_up"][:, :, :5].contiguous())


def test_modality_gate_checks():
    x, w, v = torch.randn(6, 8, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64), \
        torch.randn(6, 2, 3, dtype=torch.float64)
    image = torch.tensor([True, False, True, True, False, False])
    with pytest.raises(RuntimeError, match="image_mask must be bool, got Long"):
        C.modality_gate_forward(x, w, v, image.long())
    with pytest.raises(RuntimeError, match=r"image_mask must have shape \[T\] = \[6\], got \[5\]"):
        C.modality_gate_forward(x, w, v, image[:5])
    with pytest.raises(RuntimeError, match=r"v must have shape \[T, Hg, hd\] = \[6, 2, 3\], got \[6, 3, 3\]"):
        C.modality_gate_forward(x, w, torch.randn(6, 3, 3, dtype=torch.float64), image)
    with pytest.raises(RuntimeError, match="v has dtype BFloat16 but x has Double"):
        C.modality_gate_forward(x, w, v.bfloat16(), image)
    with pytest.raises(RuntimeError, match=r"grad_v must have shape v.shape"):
        C.modality_gate_backward(v[:, :1].contiguous(), x, w, v, image)


def test_unknown_isa_is_refused(monkeypatch):
    x, wd, wg, wu, _, _ = routed_inputs(2, experts=1, norm=False)
    monkeypatch.setenv("PILL_KERNELS_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError,
                       match="PILL_KERNELS_CPU_ISA must be generic, avx2, avx512 or avx512bf16, got 'sse9'"):
        C.routed_glu_adapter_forward(x, wd, wg, wu, None, None, 1e-6)


# ------------------------------------------------------------------------------------------------------
# Dispatch
# ------------------------------------------------------------------------------------------------------

def test_cpp_backend_registered_for_cpu_only():
    for op in ["routed_glu_adapter", "soft_routed_adapter", "modality_gate"]:
        assert "cpp" in pk.available_backends(op, "cpu")
        with pytest.raises(pk.BackendUnavailableError, match=f"backend 'cpp' cannot run op '{op}' on meta"):
            pk.explain(op, "meta", "cpp")


def test_without_the_extension_cpp_is_unavailable_and_says_how_to_build():
    # A fresh interpreter in which importing pill_kernels._C fails: the package must still import, with eager.
    code = (
        "import sys; sys.modules['pill_kernels._C'] = None\n"
        "import pill_kernels as pk\n"
        "available = pk.available_backends('routed_glu_adapter', 'cpu')\n"
        "assert 'eager' in available and 'cpp' not in available, available\n"
        "try:\n"
        "    pk.explain('routed_glu_adapter', 'cpu', 'cpp')\n"
        "except pk.BackendUnavailableError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "backend 'cpp' is not available" in result.stdout and "pip install" in result.stdout


def test_no_tokens():
    x, wd, wg, wu, ids, nw = routed_case(0, 40, 5, 2, "random", norm=True)
    assert C.routed_glu_adapter_forward(x, wd, wg, wu, ids, nw, 1e-6).shape == (0, 40)
    dx, dwd, dwg, dwu, dnw = C.routed_glu_adapter_backward(x, x, wd, wg, wu, ids, nw, 1e-6)
    assert dx.shape == (0, 40) and all(torch.equal(g, torch.zeros_like(g)) for g in (dwd, dwg, dwu, dnw))
    a = soft_inputs(tokens=0)
    keys = ["x", "w_down", "b_down", "w_up", "b_up", "routing_weights", "dropout_mask", "norm_weight"]
    grads = C.soft_routed_adapter_backward(a["x"], *[a[k] for k in keys], 1e-6, 1.0)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    x, w, v = torch.randn(0, 8, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64), \
        torch.randn(0, 2, 3, dtype=torch.float64)
    dx, dw, dv = C.modality_gate_backward(v, x, w, v, torch.zeros(0, dtype=torch.bool))
    assert torch.equal(dw, torch.zeros_like(dw)) and dx.shape == (0, 8) and dv.shape == (0, 2, 3)
