"""Routed GLU adapter (PILL MoMAE with its fused RMSNorm and skip): every backend against the eager reference,
forward and forward+backward.

GPU shapes (issue 3): bf16, D=4096, r=32, E=2, T in {2048, 8192, 32768}, image fraction in {6%, 25%, 50%}.
CPU shapes (PILL_BENCH_FULL=1, issue 5): fp32, D=1024, r=32, E=2, T=4096, 25% image tokens.
"cuda_cuda_cores" is the CUDA backend with its tensor-core kernels turned off (they take bf16/fp16 at r 16
or 32 and D a multiple of 64, so at the GPU shapes "cuda" runs them). "unfused_norm" runs the reference RMSNorm followed by the same backend's adapter without a norm, the
composition that the fused op replaces. `test_copy_bandwidth` measures the device-to-device copy bandwidth
that turns the op's bytes (x and dy read, y and dx written) into its floor.
"""
from __future__ import annotations

import pytest
import torch

import pill_kernels as pk
from pill_kernels import reference as ref

from conftest import DEVICE, FULL, ON_GPU, seed_everything, skip_unless_runs

DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
# GPU: issue 3's shapes. CPU with PILL_BENCH_FULL=1: issue 5's C++ target shape (T=4096, D=1024, r=32, fp32).
HIDDEN, RANK, EXPERTS = (4096, 32, 2) if ON_GPU else (1024, 32, 2) if FULL else (72, 8, 2)
TOKENS = [2048, 8192, 32768] if ON_GPU else [4096] if FULL else [37]
IMAGE_FRACTIONS = [0.06, 0.25, 0.5] if ON_GPU else [0.25]
# cuda_cuda_cores: the CUDA backend with its tensor-core kernels turned off (PILL_KERNELS_CUDA_MMA=0).
BACKENDS = ["reference", "eager", "triton", "cuda", "cuda_cuda_cores", "cpp"]
RUN_IMAGE_TOKENS = 1024  # image tokens come in runs, as an image's placeholders do in a sequence


def expert_ids(tokens: int, image_fraction: float) -> torch.Tensor:
    position = torch.arange(tokens, device=DEVICE) % RUN_IMAGE_TOKENS
    return (position < round(image_fraction * RUN_IMAGE_TOKENS)).long()


def make_inputs(tokens: int, image_fraction: float, requires_grad: bool):
    seed_everything()
    x = torch.randn(tokens, HIDDEN, device=DEVICE, dtype=DTYPE)
    weights = [0.02 * torch.randn(EXPERTS, HIDDEN, RANK, device=DEVICE, dtype=DTYPE) for _ in range(2)]
    w_up = 0.02 * torch.randn(EXPERTS, RANK, HIDDEN, device=DEVICE, dtype=DTYPE)
    norm_weight = 1 + 0.1 * torch.randn(HIDDEN, device=DEVICE, dtype=DTYPE)
    leaves = [x, *weights, w_up, norm_weight]
    for t in leaves:
        t.requires_grad_(requires_grad)
    return leaves, expert_ids(tokens, image_fraction)


def adapter_fn(backend: str, variant: str):
    def fused(x, w_down, w_gate, w_up, ids, norm_weight):
        if backend == "reference":
            return ref.routed_glu_adapter(x, w_down, w_gate, w_up, ids, norm_weight, 1e-6)
        return pk.routed_glu_adapter(x, w_down, w_gate, w_up, ids, norm_weight=norm_weight, backend=backend)

    def unfused(x, w_down, w_gate, w_up, ids, norm_weight):
        n = ref.rms_norm(x, norm_weight, 1e-6)
        return fused(n, w_down, w_gate, w_up, ids, None)

    return fused if variant == "fused_norm" else unfused


@pytest.mark.parametrize("image_fraction", IMAGE_FRACTIONS)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("variant", ["fused_norm", "unfused_norm"])
@pytest.mark.parametrize("pass_", ["forward", "forward_backward"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_routed_glu_adapter(benchmark, monkeypatch, backend, pass_, variant, tokens, image_fraction):
    op_backend = backend
    if backend == "cuda_cuda_cores":
        op_backend = "cuda"
        monkeypatch.setenv("PILL_KERNELS_CUDA_MMA", "0")
    skip_unless_runs("routed_glu_adapter", op_backend)
    if variant == "unfused_norm" and image_fraction != IMAGE_FRACTIONS[len(IMAGE_FRACTIONS) // 2]:
        pytest.skip("the unfused composition is measured at the middle image fraction only")
    backward = pass_ == "forward_backward"
    leaves, ids = make_inputs(tokens, image_fraction, backward)
    fn = adapter_fn(op_backend, variant)
    grad_y = torch.randn_like(leaves[0])
    x, w_down, w_gate, w_up, norm_weight = leaves

    def step():
        y = fn(x, w_down, w_gate, w_up, ids, norm_weight)
        if backward:
            torch.autograd.backward(y, grad_y, inputs=leaves)
        return y

    step()  # compile / autotune outside the timed rounds
    benchmark.extra_info.update(op="routed_glu_adapter", backend=backend, pass_=pass_, variant=variant,
                                tokens=tokens, hidden=HIDDEN, rank=RANK, experts=EXPERTS,
                                image_fraction=image_fraction, dtype=str(DTYPE), device=str(DEVICE),
                                floor_bytes=(4 if backward else 2) * x.numel() * x.element_size())
    benchmark(step)


def test_copy_bandwidth(benchmark):
    """Device-to-device copy of a buffer the size of the largest activation: bytes read + written per second."""
    numel = max(TOKENS) * HIDDEN
    src = torch.randn(numel, device=DEVICE, dtype=DTYPE)
    dst = torch.empty_like(src)
    benchmark.extra_info.update(op="copy", bytes_moved=2 * src.numel() * src.element_size(), device=str(DEVICE))
    benchmark(dst.copy_, src)


# bf16 inputs on the C++ CPU kernel: the bf16 products of AVX512-BF16 CPUs against the same kernel's fp32 products
# of the same bf16 values (PILL_KERNELS_CPU_ISA), forward+backward of the training pair, at PILL 7B's adapter width
# (D=4096, r=32; PILL_BENCH_FULL=1) and the demo's (SmolLM2-135M: D=576, r=16).
CPU_BF16_SHAPES = [(1024, 4096, 32), (1024, 576, 16)] if FULL else [(37, 72, 8)]


@pytest.mark.skipif(ON_GPU, reason="a CPU benchmark")
@pytest.mark.parametrize("tokens,hidden,rank", CPU_BF16_SHAPES)
@pytest.mark.parametrize("products", ["avx512", "avx512bf16"])
def test_routed_glu_adapter_cpu_bf16(benchmark, monkeypatch, products, tokens, hidden, rank):
    skip_unless_runs("routed_glu_adapter", "cpp")
    monkeypatch.setenv("PILL_KERNELS_CPU_ISA", products)
    if not pk.extension_info().endswith(f"CPU products on this CPU: {products}"):
        pytest.skip(f"this CPU's products are not {products}: {pk.extension_info()}")
    seed_everything()
    x = torch.randn(tokens, hidden, dtype=torch.bfloat16, requires_grad=True)
    w_down, w_gate = (0.02 * torch.randn(EXPERTS, hidden, rank, dtype=torch.bfloat16) for _ in range(2))
    w_up = 0.02 * torch.randn(EXPERTS, rank, hidden, dtype=torch.bfloat16)
    norm_weight = 1 + 0.1 * torch.randn(hidden, dtype=torch.bfloat16)
    leaves = [x, w_down.requires_grad_(), w_gate.requires_grad_(), w_up.requires_grad_(), norm_weight]
    ids = (torch.arange(tokens) % 64 < 8).long()  # the demo's 4 image tokens in 64, rounded up
    grad_y = torch.randn_like(x)

    def step():
        y = pk.routed_glu_adapter(x, w_down, w_gate, w_up, ids, norm_weight=norm_weight, backend="cpp")
        torch.autograd.backward(y, grad_y, inputs=leaves[:4])

    step()
    benchmark.extra_info.update(op="routed_glu_adapter", backend="cpp", products=products, pass_="forward_backward",
                                tokens=tokens, hidden=hidden, rank=rank, experts=EXPERTS, dtype="torch.bfloat16",
                                device="cpu")
    benchmark(step)
