"""The hand-written CUDA kernels (csrc/*.cu) against the fp64 reference, called through their compiled ops
(the schemas of csrc/op_schemas.h), on two targets:

- "cuda": the real kernels, ``torch.ops.pill_kernels_C.*`` on a GPU (marked ``gpu``; skipped without a CUDA
  device or without a CUDA build of pill_kernels._C);
- "emulated": the same .cu sources and torch bindings built for the CPU emulator (tests/cuda_emulation/), so
  every machine runs the kernels' indexing, reductions, workspace layout and launch code. It cannot show
  hardware races or GPU intrinsic rounding; the GPU run stays the final word.

The source-layout tests at the bottom keep the .cu files torch-free (CI compiles them with plain nvcc) and
every launcher paired with its header and torch binding (an op's further .cu files are its kernel families).
"""
import dataclasses
import os
import pathlib
import re
from typing import Callable

import pytest
import torch

from pill_kernels import reference
from op_testing import LOW_PRECISION, assert_matches_reference, image_mask, rounded_to

CSRC = pathlib.Path(__file__).resolve().parent.parent / "csrc"
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
OPS = ["routed_glu_adapter_forward", "routed_glu_adapter_backward", "soft_routed_adapter_forward",
       "soft_routed_adapter_backward", "modality_gate_forward", "modality_gate_backward"]


def cuda_ops():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    try:
        import pill_kernels._C  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"pill_kernels._C is not built: {exc}")
    missing = [op for op in OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"pill_kernels_C::{op}", "CUDA")]
    if missing:
        pytest.skip(f"pill_kernels._C was built without CUDA kernels for {missing} ({torch.ops.pill_kernels_C.build_info()})")
    return torch.ops.pill_kernels_C


def emulated_ops():
    import cuda_emulation
    if cuda_emulation.cuda_include_dir() is None:
        message = "no CUDA toolkit headers: the CUDA kernels cannot be built for the CPU emulator"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (CI must have them: .ci/run compiles csrc/*.cu with nvcc)")
        pytest.skip(message)
    return cuda_emulation.load()


@dataclasses.dataclass
class Kernels:
    ops: object  # torch.ops namespace holding the compiled ops
    device: str  # where their tensors live
    other_device: str  # a device they must refuse
    poison: Callable[[], None]  # makes outputs the kernels fail to write show up


@pytest.fixture(params=[pytest.param("cuda", marks=pytest.mark.gpu), "emulated"])
def kernels(request):
    if request.param == "cuda":
        return Kernels(cuda_ops(), "cuda", "cpu", poison_allocator)
    # No poisoning needed: built for the emulator, the bindings allocate outputs and workspaces filled with NaN.
    return Kernels(emulated_ops(), "cpu", "meta", lambda: None)


def poison_allocator():
    """Fill the caching allocator's free blocks with NaN, so outputs the kernels fail to write show up as NaN."""
    blocks = [torch.full((1 << 17,), float("nan"), device="cuda") for _ in range(64)]  # small pool (512 KiB each)
    blocks.append(torch.full((1 << 24,), float("nan"), device="cuda"))  # large pool (64 MiB)
    torch.cuda.synchronize()
    del blocks


def check(out, ref_lowp, ref_fp64, what):
    """The low-precision rule of docs/correctness.md in every dtype: error against fp64 at most 2x the reference's
    own error in out's dtype, plus an atol scaled to the magnitude (sums of hundreds of terms differ from fp64 by
    rounding)."""
    assert out.dtype == ref_lowp.dtype, f"{what}: dtype {out.dtype}, expected {ref_lowp.dtype}"
    assert out.shape == ref_fp64.shape, f"{what}: shape {tuple(out.shape)}, expected {tuple(ref_fp64.shape)}"
    out, ref_lowp, ref_fp64 = out.cpu(), ref_lowp.cpu(), ref_fp64.double().cpu()
    assert torch.isfinite(out).all(), f"{what}: non-finite values (an unwritten output?)"
    scale = max(ref_fp64.abs().max().item(), 1.0)
    if out.dtype in LOW_PRECISION:
        assert_matches_reference(out, ref_lowp, ref_fp64, atol=1e-5 * scale, what=what)
    else:
        err = (out.double() - ref_fp64).abs().max().item()
        ref_err = (ref_lowp.double() - ref_fp64).abs().max().item()
        # The atol covers fp32 sums taken in another order than cuBLAS's; garbage is off by O(scale).
        assert err <= 2 * ref_err + 1e-5 * scale, f"{what}: fp32 error {err:.3e} > 2 x {ref_err:.3e} + 1e-5 x {scale:.3g}"


def reference_and_grads(fn, args, differentiable, grad_out):
    """fn(*args) and d/d args (where differentiable) for grad_out, through autograd on the reference."""
    leaves = [a.detach().clone().requires_grad_(True) if d else a for a, d in zip(args, differentiable)]
    out = fn(*leaves)
    wrt = [a for a, d in zip(leaves, differentiable) if d]
    grads = torch.autograd.grad(out, wrt, grad_out)
    return out.detach(), list(grads)


def as_dtype(args, dtype, device):
    return [a.to(device=device, dtype=dtype) if isinstance(a, torch.Tensor) and a.is_floating_point()
            else (a.to(device) if isinstance(a, torch.Tensor) else a) for a in args]


# ---------------------------------------------------------------------------------------------------------
# routed_glu_adapter
# ---------------------------------------------------------------------------------------------------------

# (tokens, hidden, rank, experts, norm, mask kind): T = 1, odd T, D not a power of two nor a multiple of 8,
# r not a multiple of 16, every mask kind, an expert with no tokens (all_text / all_image / E=3 with ids {0, 2}).
ROUTED_CASES = [
    (1, 40, 5, 2, True, "one_image"),
    (33, 72, 32, 2, True, "alternating"),
    (64, 100, 16, 2, False, "all_text"),
    (17, 136, 7, 2, True, "all_image"),
    (57, 37, 32, 2, True, "random"),
    (40, 1000, 24, 2, True, "random"),
    (9, 48, 12, 1, True, None),
    (31, 64, 8, 3, False, "skip_expert_1"),
    # Shapes the tensor-core kernels take in half precision (r 16 or 32, D a multiple of 64): several
    # 64-token tiles, a partial last tile, tiles with two experts, an expert with no tokens.
    (130, 128, 32, 2, True, "random"),
    (70, 192, 16, 1, True, None),
    (64, 64, 32, 3, False, "skip_expert_1"),
    (100, 128, 16, 2, False, "alternating"),
]


def routed_case(tokens, hidden, rank, experts, norm, kind):
    x = torch.randn(tokens, hidden, dtype=torch.float64)
    w_down = torch.randn(experts, hidden, rank, dtype=torch.float64) / hidden ** 0.5
    w_gate = torch.randn(experts, hidden, rank, dtype=torch.float64) / hidden ** 0.5
    w_up = torch.randn(experts, rank, hidden, dtype=torch.float64) / rank ** 0.5
    if kind is None:
        ids = None
    elif kind == "skip_expert_1":
        ids = 2 * torch.randint(0, 2, (tokens,))
    else:
        ids = image_mask(kind, tokens).long()
    norm_weight = 1 + 0.2 * torch.randn(hidden, dtype=torch.float64) if norm else None
    return [x, w_down, w_gate, w_up, ids, norm_weight]


def routed_ref(x, w_down, w_gate, w_up, ids, norm_weight):
    return reference.routed_glu_adapter(x, w_down, w_gate, w_up, ids, norm_weight, 1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ROUTED_CASES, ids=lambda c: "-".join(map(str, c)))
def test_routed_glu_adapter(kernels, case, dtype):
    ops = kernels.ops
    args64 = rounded_to(dtype, routed_case(*case))
    has_norm = args64[5] is not None
    differentiable = [True, True, True, True, False, has_norm]
    grad64 = rounded_to(dtype, [torch.randn(args64[0].shape, dtype=torch.float64)])[0]
    y64, g64 = reference_and_grads(routed_ref, args64, differentiable, grad64)
    args = as_dtype(args64, dtype, kernels.device)
    grad = grad64.to(kernels.device, dtype)
    y_lp, g_lp = reference_and_grads(routed_ref, args, differentiable, grad)

    kernels.poison()
    y = ops.routed_glu_adapter_forward(*args, 1e-6)
    check(y, y_lp, y64, "y")
    kernels.poison()
    grads = ops.routed_glu_adapter_backward(grad, *args, 1e-6)
    names = ["dx", "dw_down", "dw_gate", "dw_up"] + (["dnorm_weight"] if has_norm else [])
    for name, got, lp, ref in zip(names, grads, g_lp, g64):
        check(got, lp, ref, name)
    if not has_norm:
        assert grads[4].numel() == 0
    again = ops.routed_glu_adapter_backward(grad, *args, 1e-6)
    for name, a, b in zip(names, grads, again):
        assert torch.equal(a, b), f"{name}: two backward runs differ (nondeterministic reduction)"


@pytest.mark.parametrize("rows", ["16", "32", "64"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_routed_glu_adapter_tensor_core_path_is_taken(kernels, dtype, rows, monkeypatch):
    """At a shape the WMMA kernels take, PILL_KERNELS_CUDA_MMA=0 (CUDA-core kernels) must change the rounding of
    the answer: proof that the default run went through the tensor-core kernels. Both match the reference, at
    every tile height of the forward and per-token backward (PILL_KERNELS_CUDA_MMA_ROWS)."""
    monkeypatch.setenv("PILL_KERNELS_CUDA_MMA_ROWS", rows)
    ops = kernels.ops
    args64 = rounded_to(dtype, routed_case(96, 128, 32, 2, True, "random"))
    args = as_dtype(args64, dtype, kernels.device)
    grad = torch.randn_like(args[0])
    results = {}
    for mma in ("1", "0"):
        monkeypatch.setenv("PILL_KERNELS_CUDA_MMA", mma)
        results[mma] = (ops.routed_glu_adapter_forward(*args, 1e-6), ops.routed_glu_adapter_backward(grad, *args, 1e-6))
    (y_mma, g_mma), (y_cc, g_cc) = results["1"], results["0"]
    assert not torch.equal(y_mma, y_cc) and not torch.equal(g_mma[0], g_cc[0]), "the tensor-core kernels did not run"
    differentiable = [True, True, True, True, False, True]
    y64, g64 = reference_and_grads(routed_ref, args64, differentiable, grad.double().cpu())
    y_lp, g_lp = reference_and_grads(routed_ref, args, differentiable, grad)
    for path, y, grads in (("tensor cores", y_mma, g_mma), ("CUDA cores", y_cc, g_cc)):
        check(y, y_lp, y64, f"y ({path})")
        for name, got, lp, ref in zip(["dx", "dw_down", "dw_gate", "dw_up", "dnorm_weight"], grads, g_lp, g64):
            check(got, lp, ref, f"{name} ({path})")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_kernels_take_zero_tokens(kernels, dtype):
    """T = 0 (an empty ids tensor has a null data pointer): empty outputs, zero weight gradients."""
    ops = kernels.ops
    x, wd, wg, wu, ids, nw = as_dtype(routed_case(0, 128, 32, 2, True, "random"), dtype, kernels.device)
    assert ops.routed_glu_adapter_forward(x, wd, wg, wu, ids, nw, 1e-6).shape == (0, 128)
    dx, *weight_grads = ops.routed_glu_adapter_backward(x, x, wd, wg, wu, ids, nw, 1e-6)
    assert dx.shape == (0, 128) and all(g.eq(0).all() for g in weight_grads)
    s = as_dtype(soft_case(0, 64, 8, 2, True, True), dtype, kernels.device)
    assert ops.soft_routed_adapter_forward(*s, 1e-6, 0.7).shape == (0, 64)
    dx, *weight_grads = ops.soft_routed_adapter_backward(s[0], *s, 1e-6, 0.7)
    assert dx.shape == (0, 64) and all(g.eq(0).all() for g in weight_grads)
    x, w, v, mask = as_dtype(gate_case(0, 40, 3, 8, "random"), dtype, kernels.device)
    assert ops.modality_gate_forward(x, w, v, mask).shape == (0, 3, 8)
    dx, dw, dv = ops.modality_gate_backward(v, x, w, v, mask)
    assert dx.shape == (0, 40) and dv.shape == (0, 3, 8) and dw.eq(0).all()


@pytest.mark.parametrize("mma", ["1", "0"], ids=["tensor_cores", "cuda_cores"])
def test_routed_glu_adapter_out_of_range_ids_give_nan_rows(kernels, mma, monkeypatch):
    """The Python layer range-checks expert ids; should one slip through (PILL_KERNELS_CHECKS=0), its token's
    output and input gradient are NaN and it adds nothing to any weight gradient."""
    monkeypatch.setenv("PILL_KERNELS_CUDA_MMA", mma)
    ops = kernels.ops
    args64 = rounded_to(torch.bfloat16, routed_case(80, 128, 32, 2, True, "random"))
    bad = torch.tensor([3, 70])
    args64[4][bad] = torch.tensor([2, -1])
    args = as_dtype(args64, torch.bfloat16, kernels.device)
    grad = torch.randn_like(args[0])
    y = ops.routed_glu_adapter_forward(*args, 1e-6)
    dx, *weight_grads = ops.routed_glu_adapter_backward(grad, *args, 1e-6)
    good = torch.ones(80, dtype=torch.bool)
    good[bad] = False
    assert y[bad].isnan().all() and dx[bad].isnan().all()
    assert not y[good].isnan().any() and not dx[good].isnan().any()
    # Without the bad tokens the weight gradients are the same.
    kept = [a[good.to(a.device)] if i in (0, 4) else a for i, a in enumerate(args)]
    _, *expected = ops.routed_glu_adapter_backward(grad[good.to(grad.device)], *kept, 1e-6)
    for got, want in zip(weight_grads, expected):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_routed_glu_adapter_misaligned_rows(kernels, dtype, monkeypatch):
    """D a multiple of 8 but every row base off by one element: the scalar path must give the vector path's answer
    (both CUDA-core kernels: aligned half-precision rows at this shape would otherwise take the tensor cores)."""
    monkeypatch.setenv("PILL_KERNELS_CUDA_MMA", "0")
    ops = kernels.ops
    args64 = routed_case(23, 64, 32, 2, True, "random")
    args = as_dtype(args64, dtype, kernels.device)
    buf = torch.empty(args[0].numel() + 1, device=kernels.device, dtype=dtype)
    x_off = buf[1:].view_as(args[0])
    x_off.copy_(args[0])
    assert x_off.is_contiguous() and x_off.data_ptr() % 16 != 0
    grad = torch.randn_like(args[0])
    y_vec = ops.routed_glu_adapter_forward(*args, 1e-6)
    y_sc = ops.routed_glu_adapter_forward(x_off, *args[1:], 1e-6)
    y64 = routed_ref(*args64)
    y_lp = routed_ref(*args)
    check(y_sc, y_lp, y64, "y (scalar path)")
    torch.testing.assert_close(y_sc, y_vec, rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=1e-2)
    g_vec = ops.routed_glu_adapter_backward(grad, *args, 1e-6)
    g_sc = ops.routed_glu_adapter_backward(grad, x_off, *args[1:], 1e-6)
    for a, b in zip(g_vec, g_sc):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2 if dtype != torch.float32 else 1e-4, atol=2e-2)


def test_routed_glu_adapter_bad_inputs(kernels):
    ops = kernels.ops
    x, wd, wg, wu, ids, nw = as_dtype(routed_case(8, 40, 5, 2, True, "random"), torch.bfloat16, kernels.device)
    with pytest.raises(RuntimeError, match="float16, bfloat16 or float32"):
        ops.routed_glu_adapter_forward(x.double(), wd.double(), wg.double(), wu.double(), ids, nw.double(), 1e-6)
    with pytest.raises(RuntimeError, match="w_gate must have dtype"):
        ops.routed_glu_adapter_forward(x, wd, wg.half(), wu, ids, nw, 1e-6)
    with pytest.raises(RuntimeError, match="w_up must have shape"):
        ops.routed_glu_adapter_forward(x, wd, wg, wu[:, :4], ids, nw, 1e-6)
    with pytest.raises(RuntimeError, match="expert_ids is on"):
        ops.routed_glu_adapter_forward(x, wd, wg, wu, ids.to(kernels.other_device), nw, 1e-6)
    with pytest.raises(RuntimeError, match="expert_ids must have dtype"):
        ops.routed_glu_adapter_forward(x, wd, wg, wu, ids.int(), nw, 1e-6)
    with pytest.raises(RuntimeError, match="expert_ids is required"):
        ops.routed_glu_adapter_forward(x, wd, wg, wu, None, nw, 1e-6)
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        ops.routed_glu_adapter_forward(x.t().contiguous().t(), wd, wg, wu, ids, nw, 1e-6)
    with pytest.raises(RuntimeError, match=r"bottleneck r in \[1, 32\]"):
        big = torch.randn(2, 40, 40, device=kernels.device, dtype=torch.bfloat16)
        ops.routed_glu_adapter_forward(x, big, big, big.transpose(1, 2).contiguous(), ids, nw, 1e-6)
    with pytest.raises(RuntimeError, match="grad_y must have shape"):
        ops.routed_glu_adapter_backward(x[:4], x, wd, wg, wu, ids, nw, 1e-6)


# ---------------------------------------------------------------------------------------------------------
# soft_routed_adapter
# ---------------------------------------------------------------------------------------------------------

# (tokens, hidden, rank, experts, norm, dropout)
SOFT_CASES = [
    (1, 40, 8, 2, True, False),
    (33, 72, 8, 2, True, True),
    (64, 100, 5, 2, False, True),
    (17, 37, 32, 3, True, True),
    (40, 1000, 12, 2, True, False),
]


def soft_case(tokens, hidden, rank, experts, norm, dropout):
    f64 = dict(dtype=torch.float64)
    return [torch.randn(tokens, hidden, **f64), torch.randn(hidden, rank, **f64) / hidden ** 0.5,
            0.1 * torch.randn(rank, **f64), torch.randn(experts, rank, hidden, **f64) / rank ** 0.5,
            0.1 * torch.randn(experts, hidden, **f64), torch.softmax(torch.randn(tokens, experts, **f64), -1),
            (torch.rand(tokens, rank) > 0.25).double() / 0.75 if dropout else None,
            1 + 0.2 * torch.randn(hidden, **f64) if norm else None]


def soft_ref(x, w_down, b_down, w_up, b_up, routing, mask, norm_weight):
    return reference.soft_routed_adapter(x, w_down, b_down, w_up, b_up, routing, mask, norm_weight, 1e-6, 0.7)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SOFT_CASES, ids=lambda c: "-".join(map(str, c)))
def test_soft_routed_adapter(kernels, case, dtype):
    ops = kernels.ops
    args64 = rounded_to(dtype, soft_case(*case))
    has_norm = args64[7] is not None
    differentiable = [True] * 6 + [False, has_norm]
    grad64 = rounded_to(dtype, [torch.randn(args64[0].shape, dtype=torch.float64)])[0]
    y64, g64 = reference_and_grads(soft_ref, args64, differentiable, grad64)
    args = as_dtype(args64, dtype, kernels.device)
    grad = grad64.to(kernels.device, dtype)
    y_lp, g_lp = reference_and_grads(soft_ref, args, differentiable, grad)

    kernels.poison()
    y = ops.soft_routed_adapter_forward(*args, 1e-6, 0.7)
    check(y, y_lp, y64, "y")
    kernels.poison()
    grads = ops.soft_routed_adapter_backward(grad, *args, 1e-6, 0.7)
    names = ["dx", "dw_down", "db_down", "dw_up", "db_up", "drouting_weights"] + (["dnorm_weight"] if has_norm else [])
    for name, got, lp, ref in zip(names, grads, g_lp, g64):
        check(got, lp, ref, name)
    if not has_norm:
        assert grads[6].numel() == 0
    again = ops.soft_routed_adapter_backward(grad, *args, 1e-6, 0.7)
    for name, a, b in zip(names, grads, again):
        assert torch.equal(a, b), f"{name}: two backward runs differ (nondeterministic reduction)"


def test_soft_routed_adapter_bad_inputs(kernels):
    ops = kernels.ops
    args = as_dtype(soft_case(6, 40, 8, 2, True, True), torch.float16, kernels.device)
    with pytest.raises(RuntimeError, match="routing_weights must have shape"):
        ops.soft_routed_adapter_forward(*args[:5], args[5][:, :1].contiguous(), *args[6:], 1e-6, 1.0)
    with pytest.raises(RuntimeError, match="dropout_mask must have dtype"):
        ops.soft_routed_adapter_forward(*args[:6], args[6].float(), args[7], 1e-6, 1.0)
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        ops.soft_routed_adapter_forward(*[a.to(kernels.other_device) if a is not None else None for a in args], 1e-6, 1.0)


# ---------------------------------------------------------------------------------------------------------
# modality_gate
# ---------------------------------------------------------------------------------------------------------

# (tokens, hidden, heads, head_dim, mask kind)
GATE_CASES = [
    (1, 40, 3, 8, "one_image"),
    (33, 72, 4, 16, "alternating"),
    (20, 100, 9, 64, "all_text"),
    (17, 37, 3, 5, "all_image"),
    (50, 576, 32, 128, "random"),
]


def gate_case(tokens, hidden, heads, head_dim, kind):
    return [torch.randn(tokens, hidden, dtype=torch.float64),
            torch.randn(hidden, heads, dtype=torch.float64) / hidden ** 0.5,
            torch.randn(tokens, heads, head_dim, dtype=torch.float64), image_mask(kind, tokens)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", GATE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_modality_gate(kernels, case, dtype):
    ops = kernels.ops
    args64 = rounded_to(dtype, gate_case(*case))
    differentiable = [True, True, True, False]
    grad64 = rounded_to(dtype, [torch.randn(args64[2].shape, dtype=torch.float64)])[0]
    y64, g64 = reference_and_grads(reference.modality_gate, args64, differentiable, grad64)
    args = as_dtype(args64, dtype, kernels.device)
    grad = grad64.to(kernels.device, dtype)
    y_lp, g_lp = reference_and_grads(reference.modality_gate, args, differentiable, grad)

    kernels.poison()
    out = ops.modality_gate_forward(*args)
    check(out, y_lp, y64, "out")
    kernels.poison()
    grads = ops.modality_gate_backward(grad, *args)
    for name, got, lp, ref in zip(["dx", "dw_gate", "dv"], grads, g_lp, g64):
        check(got, lp, ref, name)
    again = ops.modality_gate_backward(grad, *args)
    for a, b in zip(grads, again):
        assert torch.equal(a, b), "two backward runs differ (nondeterministic reduction)"


def test_modality_gate_bad_inputs(kernels):
    ops = kernels.ops
    x, w, v, mask = as_dtype(gate_case(6, 40, 3, 8, "random"), torch.bfloat16, kernels.device)
    with pytest.raises(RuntimeError, match="image_mask must have dtype"):
        ops.modality_gate_forward(x, w, v, mask.long())
    with pytest.raises(RuntimeError, match="v must have shape"):
        ops.modality_gate_forward(x, w, v[:, :2].contiguous(), mask)
    with pytest.raises(RuntimeError, match="v must be contiguous"):
        ops.modality_gate_forward(x, w, v.transpose(0, 1).contiguous().transpose(0, 1), mask)


# ---------------------------------------------------------------------------------------------------------
# Source layout (runs without a GPU).
# ---------------------------------------------------------------------------------------------------------

TORCH_INCLUDE = re.compile(r'#\s*include\s*[<"](torch/|ATen/|c10/|caffe2/|pybind11/|Python\.h)')
LOCAL_INCLUDE = re.compile(r'#\s*include\s*"([^"]+)"')


def local_closure(path):
    """The file and every csrc header it includes, transitively."""
    seen, todo = set(), [path]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        for name in LOCAL_INCLUDE.findall(p.read_text()):
            if (CSRC / name).exists():
                todo.append(CSRC / name)
    return seen


def test_cuda_sources_are_torch_free():
    cu_files = sorted(CSRC.glob("*.cu"))
    assert cu_files, "no csrc/*.cu files"
    for cu in cu_files:
        for f in local_closure(cu):
            hits = TORCH_INCLUDE.findall(f.read_text())
            assert not hits, f"{f.name} (included by {cu.name}) includes torch headers {hits}: .cu files must stay pure CUDA"


def test_every_cuda_kernel_has_header_and_binding():
    declared = set(re.findall(r'm\.def\("(\w+)\(', (CSRC / "op_schemas.h").read_text()))
    cu_files = sorted(CSRC.glob("*.cu"))
    launchers = [cu for cu in cu_files if (CSRC / f"{cu.stem}.h").exists()]
    for cu in cu_files:
        if cu in launchers:
            continue
        # A kernel family of an op whose kernels span several files: csrc/<op>_<family>.cu, launched from
        # csrc/<op>.cu through the launch functions of csrc/<op>.cuh, which both include.
        owners = [op for op in launchers if cu.stem.startswith(op.stem + "_")]
        assert owners, f"{cu.name} has no launcher header {cu.stem}.h and is no kernel family of a csrc/<op>.cu"
        op = max(owners, key=lambda p: len(p.stem))
        shared = f"{op.stem}.cuh"
        assert (CSRC / shared).exists(), f"{cu.name} is a kernel family of {op.name}, but there is no {shared}"
        for f in (cu, op):
            assert f'#include "{shared}"' in f.read_text(), f"{f.name} does not include {shared}"
        assert not (CSRC / f"{cu.stem}_cuda.cpp").exists(), f"{cu.name} is bound through {op.stem}_cuda.cpp only"
    for cu in launchers:
        op = cu.stem
        header, binding = CSRC / f"{op}.h", CSRC / f"{op}_cuda.cpp"
        assert header.exists(), f"{cu.name} has no launcher header {header.name}"
        assert binding.exists(), f"{cu.name} has no torch binding {binding.name}"
        assert f'#include "{header.name}"' in cu.read_text(), f"{cu.name} does not include {header.name}"
        text = binding.read_text()
        assert f'#include "{header.name}"' in text, f"{binding.name} does not include {header.name}"
        # PILL_CUDA_LIBRARY_IMPL (cuda_binding_utils.h) is TORCH_LIBRARY_IMPL(pill_kernels_C, CUDA, m), or the
        # emulator's namespace in its build.
        assert "PILL_CUDA_LIBRARY_IMPL(m)" in text, f"{binding.name} registers no CUDA kernels"
        impls = set(re.findall(r'm\.impl\("(\w+)"', text))
        assert impls == {f"{op}_forward", f"{op}_backward"}, f"{binding.name} registers {sorted(impls)}"
        assert impls <= declared, f"{binding.name} implements ops without a schema in op_schemas.h: {impls - declared}"
        assert "kernel_stream(x)" in text and "KernelDeviceGuard" in text, f"{binding.name} must launch on the current stream of x's device"


def test_cpu_build_leaves_cuda_bindings_out():
    setup = (CSRC.parent / "setup.py").read_text()
    assert '_cuda.cpp' in setup and "cuda_bindings" in setup, "setup.py must keep csrc/*_cuda.cpp out of the C++-only build"


# ---------------------------------------------------------------------------------------------------------
# The models on the (emulated) CUDA kernels
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture
def emulated_kernels_as_cpu_backend(monkeypatch):
    """The emulated CUDA kernels registered, through compiled.py's own wrappers, as the CPU ("cpp") backend of
    the three adapter ops for this test, so "auto" on CPU runs them inside the models."""
    import cuda_emulation
    from pill_kernels import compiled, dispatch

    emulated_ops()
    registry = {op: dict(backends) for op, backends in dispatch._registry.items()}
    monkeypatch.setattr(dispatch, "_registry", registry)
    for op, emulated in compiled.compiled_kernels(cuda_emulation.NAMESPACE).items():
        dispatch.register(op, "cpp", emulated.forward, emulated.backward, unavailable_reason=compiled.only_on("cpu"),
                          **emulated.saving_pair("CPU"))
    for op in ("routed_glu_adapter", "soft_routed_adapter", "modality_gate"):
        assert dispatch.explain(op, "cpu")[0] == "cpp"


@pytest.mark.parametrize("method,dtype,hidden,adapter_dim", [
    ("pill", torch.float32, 40, 5),
    ("lavin", torch.float32, 40, 6),
    # The tensor-core kernels' shapes (D a multiple of 64, r = 16) in bf16.
    ("pill", torch.bfloat16, 64, 16),
], ids=lambda v: str(v).replace("torch.", ""))
def test_models_on_the_cuda_kernels_equal_the_eager_models(emulated_kernels_as_cpu_backend, method, dtype, hidden,
                                                            adapter_dim):
    import pill
    from conftest import IMAGE_TOKEN, VISION_DIM, make_llama, randomize_adapters
    from test_models import all_adapter_params_trainable, batch_for

    import pill_kernels as pk

    llama = make_llama(torch.float32, hidden=hidden)
    if method == "pill":
        model = pill.inject_pill(llama, pill.PillConfig(adapter_dim=adapter_dim), vision_dim=VISION_DIM,
                                 image_token_id=IMAGE_TOKEN)
    else:
        model = pill.inject_lavin(llama, pill.LavinConfig(adapter_dim=adapter_dim, groups=2, dropout=0.0),
                                  vision_dim=VISION_DIM, image_token_id=IMAGE_TOKEN)
    pill.set_stage(model, model.multimodal.config.stages[-1])
    randomize_adapters(model)
    model = model.to(dtype)
    params = all_adapter_params_trainable(model)
    ids, features, extra = batch_for(method, seq=9)
    features = features.to(dtype)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0

    def run(backend):
        with pk.use_backend(backend):
            logits = model(input_ids=ids, attention_mask=mask, image_features=features, **extra).logits
        grads = torch.autograd.grad((logits.float() * mask[..., None]).square().sum(), list(params.values()),
                                    allow_unused=True)
        return logits.detach().float(), grads

    (logits_c, grads_c), (logits_e, grads_e) = run("auto"), run("eager")
    low = dtype != torch.float32
    # bf16: two roundings of a 3-layer model apart; a wrong kernel is off by O(1) of the scale.
    tol = dict(rtol=5e-2, atol=5e-2 * logits_e.abs().max().item()) if low else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(logits_c, logits_e, **tol)
    for name, gc, ge in zip(params, grads_c, grads_e):
        if ge is None:
            assert gc is None, name
            continue
        gtol = dict(rtol=1e-1, atol=1e-1 * ge.abs().max().item()) if low else dict(rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(gc.float(), ge.float(), **gtol, msg=lambda m: f"{name}: {m}")
