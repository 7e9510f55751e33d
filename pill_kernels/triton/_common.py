"""Pieces shared by the Triton kernels: interpreter detection, launch configuration (tile sizes, token splits of
the weight-gradient kernels) and small jit helpers.

The Triton interpreter (TRITON_INTERPRET=1, how CI runs these kernels on CPU) has gaps that are handled here,
in launch code, never by loosening test tolerances (docs/kernels.md, "Triton under the interpreter"):
- `tl.dot` on bf16 operands returns garbage: operands are upcast to fp32 when interpreting. That is exact: a
  product of two bf16/fp16 numbers is exact in fp32, as in the tensor cores' fp32-accumulating MMA.
- its float32 -> bfloat16 conversion truncates instead of rounding to nearest even: `cast` rounds first.
- libdevice's tanh fails: `tanh` below is written with a sigmoid.
- run time grows with programs x loop iterations: interpreted launches use few, large tiles.
- the interpreter of triton 3.6 (the GPU image's release) turns a loop bound into a Python int with
  `int(array)` on a one-element array, which numpy 2.4 made an error (triton 3.8 squeezes first): every kernel
  looping over a runtime bound fails there. A probe kernel run once at import (interpreter only) finds this, and
  `unavailable_reason` names the fix instead of letting each launch fail. Compiled kernels on a GPU never touch numpy.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _interpreter_probe():
    pass


# triton.jit decides at decoration time whether a kernel is compiled or interpreted.
INTERPRET = type(_interpreter_probe).__name__ == "InterpretedFunction"
_ROUND_BF16_BY_HAND = tl.constexpr(INTERPRET)


@triton.jit
def _runtime_bound_loop_probe(out_ptr, n):
    total = 0
    for _ in range(n):
        total += 1
    tl.store(out_ptr, total)


def interpreter_problem() -> str | None:
    """Why this Triton's interpreter cannot run the kernels in this environment, or None."""
    out = torch.zeros(1, dtype=torch.int32)
    try:
        _runtime_bound_loop_probe[(1,)](out, 3)
    except Exception as exc:  # the interpreter wraps what failed in its own InterpreterError
        import numpy

        problem = (f"the Triton interpreter of triton {triton.__version__} fails on a loop over a runtime bound "
                   f"with numpy {numpy.__version__} ({exc})")
        if "0-dimensional arrays" in str(exc):
            problem += (": triton before 3.8 converts one-element arrays with int(), an error since numpy 2.4. "
                        "Install triton>=3.8 or numpy<2.4 to run the Triton kernels on CPU")
        return problem + "; compiled kernels on a GPU are not affected"
    if int(out.item()) != 3:
        return f"the Triton interpreter of triton {triton.__version__} ran a 3-step loop {int(out.item())} times"
    return None


# Run at import, not at the first call: dispatch asks for the reason inside code that torch.compile traces.
INTERPRETER_PROBLEM = interpreter_problem() if INTERPRET else None


def unavailable_reason(device: torch.device) -> str | None:
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        if major < 8:
            return f"the Triton kernels need compute capability 8.0 or newer (bf16 MMA); {device} has {major}.x"
        return None
    if device.type == "cpu" and INTERPRET:
        return INTERPRETER_PROBLEM
    return (f"Triton kernels run on CUDA GPUs (and on CPU only under TRITON_INTERPRET=1, set before triton is "
            f"imported); got {device}")


def auto_skip_reason(device: torch.device) -> str | None:
    if device.type == "cpu":
        return "Triton on CPU is the interpreter (correct, slow); ask for backend='triton' by name"
    return None


def accumulator_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def check_dtype(op: str, dtype: torch.dtype, device: torch.device) -> None:
    if dtype == torch.float64 and device.type == "cuda":
        raise TypeError(f"{op}: the Triton backend runs float16, bfloat16 and float32 on the GPU, got float64; use "
                        f"backend='eager' for float64")


def check_index_range(op: str, *tensors: torch.Tensor) -> None:
    # Kernels index with int32 offsets (cheaper address arithmetic); larger tensors must be split by the caller.
    for t in tensors:
        if t.numel() >= 2 ** 31:
            raise ValueError(f"{op}: the Triton backend indexes tensors of fewer than 2**31 elements, got a tensor of "
                             f"shape {tuple(t.shape)}; split the batch into smaller calls")


def mma_precision(dtype: torch.dtype) -> bool:
    """Whether fp32 operands must use full-precision ("ieee") dots: TF32 would be ~1000x less accurate than the
    fp32 reference, which the correctness rule (docs/correctness.md, "The low-precision rule") does not allow."""
    return dtype in (torch.float32, torch.float64)


def pow2_at_least_16(n: int) -> int:
    # tl.dot needs every block dimension to be a power of two and at least 16.
    return max(16, triton.next_power_of_2(n))


def token_blocks(hidden: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_D, num_warps) of the per-token adapter kernels (routed and soft-routed). GPU: 64-token tiles feed the MMA; 64-wide D chunks keep a program's
    x/dy/weight chunks in registers at r <= 64; 8 warps because with 4 the kernels spill registers on sm_90
    (cuobjdump on the cubins tests/triton_gpu_compile.py builds). Not yet timed on a GPU."""
    if INTERPRET:
        return 16, 32, 1
    if dtype == torch.float32:  # fp32 tiles take twice the registers
        return 32, 32, 8
    return 64, 64, 8


def token_splits(device, d_chunks, experts, tiles):
    """How many programs share the token tiles of a weight-gradient kernel (each sums a partial slab)."""
    # Enough programs to fill the GPU; each split's partial weight gradients cost E*3*r*D fp32 of workspace.
    if INTERPRET or device.type != "cuda":
        return 1
    programs = torch.cuda.get_device_properties(device).multi_processor_count * 2
    return max(1, min(tiles, triton.cdiv(programs, d_chunks * experts), 16))


@triton.jit
def dot(a, b, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def cast(x, dtype: tl.constexpr):
    """x.to(dtype) with round-to-nearest-even, also under the interpreter."""
    if _ROUND_BF16_BY_HAND and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def rms_rstd(sumsq, D, eps, HAS_NORM: tl.constexpr):
    """The RMSNorm's 1/rms per row from the row's sum of squares; ones when the norm is not fused."""
    if HAS_NORM:
        return 1.0 / tl.sqrt(sumsq / D + eps)
    return tl.zeros_like(sumsq) + 1.0


@triton.jit
def tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0
