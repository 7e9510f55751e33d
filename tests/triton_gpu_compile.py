"""Compile every Triton kernel of pill_kernels for real GPUs (sm_80, sm_90) on a machine without one.

The Triton interpreter checks what the kernels compute, not whether they compile: it accepts dot shapes, dtype
mixes and control flow that the GPU compiler rejects. This script runs each backend's launch functions with
CPU tensors while `JITFunction.run` is replaced by a recorder, then compiles every recorded launch through
Triton's full pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin with ptxas) for each target architecture.
Run it without TRITON_INTERPRET (tests/test_triton_gpu_compile.py does, in a subprocess).

    python tests/triton_gpu_compile.py 80 90
"""
from __future__ import annotations

import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

_POINTER_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.float64: "*fp64",
                  torch.int64: "*i64", torch.int32: "*i32", torch.bool: "*i1"}
recorded: dict[tuple, tuple] = {}


def _record(self, *args, grid, warmup, **kwargs):
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    bound = dict(zip(self.arg_names, args))
    bound.update(kwargs)
    signature, constexprs = {}, {}
    for index, name in enumerate(self.arg_names):
        value = bound[name]
        if index in self.constexprs:
            signature[name] = "constexpr"
            constexprs[name] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = _POINTER_TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{self.fn.__name__}: cannot type argument {name}={value!r}")
    key = (self.fn.__qualname__, self.fn.__module__, tuple(signature.items()), tuple(map(str, constexprs.items())),
           tuple(options.items()))
    recorded.setdefault(key, (self, signature, constexprs, options))


def record_launches() -> None:
    from pill_kernels.triton import gated_attention, modality_gate, routed_glu_adapter, soft_routed_adapter

    def t(*shape, dtype):
        return torch.randn(*shape, dtype=dtype)

    # fp16 compiles through the same paths as bf16; fp32 exercises the full-precision ("ieee") dots.
    for dtype in (torch.bfloat16, torch.float32):
        tokens, hidden, rank = 100, 72, 20
        x = t(tokens, hidden, dtype=dtype)
        for experts, norm in ((2, True), (1, False)):
            w = [t(experts, hidden, rank, dtype=dtype) for _ in range(2)] + [t(experts, rank, hidden, dtype=dtype)]
            ids = torch.randint(0, experts, (tokens,)) if experts > 1 else None
            g = t(hidden, dtype=dtype) if norm else None
            routed_glu_adapter.forward(x, *w, ids, g, 1e-6)
            routed_glu_adapter.backward(x, x, *w, ids, g, 1e-6)
        for mask, norm in ((True, True), (False, False)):
            args = (t(hidden, rank, dtype=dtype), t(rank, dtype=dtype), t(3, rank, hidden, dtype=dtype),
                    t(3, hidden, dtype=dtype), t(tokens, 3, dtype=dtype), t(tokens, rank, dtype=dtype) if mask else None,
                    t(hidden, dtype=dtype) if norm else None, 1e-6, 0.5)
            soft_routed_adapter.forward(x, *args)
            soft_routed_adapter.backward(x, x, *args)
        v = t(tokens, 8, 128, dtype=dtype)
        image = torch.rand(tokens) < 0.5
        modality_gate.forward(x, t(hidden, 8, dtype=dtype), v, image)
        modality_gate.backward(v, x, t(hidden, 8, dtype=dtype), v, image)
        for head_dim, full, packed, window in ((64, True, False, 0), (64, False, False, 0), (128, True, False, 0),
                                               (64, True, True, 0), (128, False, True, 0), (64, True, False, 9),
                                               (128, False, True, 9)):
            q = t(2, 4, 33, head_dim, dtype=dtype)
            k, v = t(2, 2, 40, head_dim, dtype=dtype), t(2, 2, 40, head_dim, dtype=dtype)
            extra = (t(2, 4, 40, dtype=dtype), torch.rand(2, 40) < 0.5, torch.rand(2, 40) < 0.9,
                     t(2, 2, 10, head_dim, dtype=dtype), t(2, 2, 10, head_dim, dtype=dtype), t(4, dtype=dtype)) \
                if full else (None,) * 6
            segments = (torch.arange(40).repeat(2, 1) // 13).to(torch.int32) if packed else None
            extra += (segments, (torch.arange(10).repeat(2, 1) // 4).to(torch.int32) if packed and full else None)
            out = torch.empty_like(q)
            lse = torch.empty(2, 4, 33)
            gated_attention.forward(q, k, v, *extra, True, head_dim ** -0.5, window)
            gated_attention.backward(q, out, lse, q, k, v, *extra, True, head_dim ** -0.5, window)


def main(capabilities: list[int]) -> int:
    original = JITFunction.run
    JITFunction.run = _record
    try:
        record_launches()
    finally:
        JITFunction.run = original
    failures = 0
    for capability in capabilities:
        target = GPUTarget("cuda", capability, 32)
        for kernel, signature, constexprs, options in recorded.values():
            name = f"{kernel.fn.__module__}.{kernel.fn.__name__} sm_{capability} {constexprs}"
            try:
                compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                          target=target, options=options)
                assert "cubin" in compiled.asm, name
            except Exception as exc:  # report every failure, not only the first
                failures += 1
                print(f"FAILED {name}: {type(exc).__name__}: {str(exc)[:2000]}", flush=True)
    print(f"compiled {len(recorded)} kernel variants for sm_{capabilities}: {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main([int(c) for c in sys.argv[1:]] or [80, 90]))
