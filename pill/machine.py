"""Choices that depend on the machine a run lands on, measured there rather than guessed: the frozen base's
compute dtype (bf16 where this CPU runs the model's GEMMs enough faster) and the intra-op thread count (a CPU
shared with busy processes can make all cores slower than one), re-checked during a run when steps slow down.
Every choice comes with the measured reason, for the log."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

DTYPE_CHOICES = ("auto", "fastest", "float32", "bfloat16")
# bf16 pays off only where its GEMMs are clearly faster: the step also holds work that does not speed up
# (norms, softmax, the fp32 adapters' casts). Below this width a step is dominated by per-op overhead.
BF16_MIN_SPEEDUP = 1.5
BF16_MIN_HIDDEN = 256


def dtype_name(dtype: torch.dtype | None) -> str | None:
    """"bfloat16" for torch.bfloat16 (the names train.dtype and checkpoints use); None stays None."""
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _best_time(fn, repeats: int = 3, inner: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - start) / inner)
    return best


def gemm_seconds(tokens: int, hidden: int, width: int, dtype: torch.dtype, device="cpu") -> float:
    """Best time of one [tokens, hidden] @ [hidden, width] GEMM in `dtype` on `device`."""
    a = torch.randn(tokens, hidden, device=device).to(dtype)
    w = torch.randn(hidden, width, device=device).to(dtype)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    def run():
        a @ w
        sync()

    return _best_time(run)


def choose_compute_dtype(model, requested: str = "auto", tokens: int = 1024) -> tuple[torch.dtype, str]:
    """(dtype, why) for the frozen base of `model` (a CausalLM of a supported family, injected or not).

    "float32" / "bfloat16" are taken as asked. "auto": bf16 on a CUDA GPU that supports it (the seeds' recipe),
    fp32 on a CPU, because training with a bf16 base measured lower held-out accuracy there (the PILL demo: 76-78%
    instead of 95%, 2026-12-02). "fastest": bf16 on such a GPU; on a CPU, bf16 when a GEMM of the model's shape
    ([tokens, hidden] @ [hidden, intermediate]) measures at least BF16_MIN_SPEEDUP times faster in bf16 than in
    fp32 and the model is at least BF16_MIN_HIDDEN wide. A base that is neither fp32 nor bf16 (a float64 test
    model, an fp16 checkpoint) is left in its dtype by "auto" and "fastest"."""
    if requested not in DTYPE_CHOICES:
        raise ValueError(f"dtype must be one of {DTYPE_CHOICES}, got {requested!r}")
    current = model.get_input_embeddings().weight.dtype
    if requested == "float32":
        return torch.float32, "asked for float32"
    if requested == "bfloat16":
        return torch.bfloat16, "asked for bfloat16"
    device = model.get_input_embeddings().weight.device
    if current not in (torch.float32, torch.bfloat16):
        return current, f"{requested}: the base is {current}; left as it is"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, f"{requested}: {torch.cuda.get_device_name(device)} runs bf16"
        return torch.float32, f"{requested}: {torch.cuda.get_device_name(device)} has no bf16"
    if requested == "auto":
        return torch.float32, ("auto: float32 on a CPU (a bf16 base trained to lower accuracy in the PILL demo; "
                               "dtype 'fastest' takes bf16 where this CPU runs it faster)")
    hidden = model.config.hidden_size
    width = getattr(model.config, "intermediate_size", 4 * hidden)
    if hidden < BF16_MIN_HIDDEN:
        return torch.float32, f"fastest: hidden size {hidden} < {BF16_MIN_HIDDEN}: per-op overhead dominates"
    fp32 = gemm_seconds(tokens, hidden, width, torch.float32)
    bf16 = gemm_seconds(tokens, hidden, width, torch.bfloat16)
    shape = f"a {tokens}x{hidden} @ {hidden}x{width} GEMM takes {bf16 * 1e3:.1f} ms in bf16, {fp32 * 1e3:.1f} ms in fp32"
    if fp32 / bf16 >= BF16_MIN_SPEEDUP:
        return torch.bfloat16, f"fastest: {shape} on this CPU ({fp32 / bf16:.1f}x)"
    return torch.float32, f"fastest: {shape} on this CPU ({fp32 / bf16:.1f}x < {BF16_MIN_SPEEDUP}x)"


def attention_seconds(batch: int, heads: int, kv_heads: int, seq: int, head_dim: int, dtype: torch.dtype,
                      compute_in: torch.dtype) -> float:
    """Best time of a causal sdpa forward and backward on `dtype` inputs computed in `compute_in` (cast in and out,
    as the decoder layers do), at the given shape, on the CPU."""
    q = torch.randn(batch, heads, seq, head_dim).to(dtype).requires_grad_(True)
    k = torch.randn(batch, kv_heads, seq, head_dim).to(dtype).requires_grad_(True)
    v = torch.randn(batch, kv_heads, seq, head_dim).to(dtype).requires_grad_(True)
    group = heads // kv_heads

    def run():
        kk, vv = (t.to(compute_in).repeat_interleave(group, dim=1) for t in (k, v))
        out = torch.nn.functional.scaled_dot_product_attention(q.to(compute_in), kk, vv, is_causal=True)
        out.to(dtype).sum().backward()

    return _best_time(run, repeats=3, inner=2)


def choose_attention_dtype(model, dtype: torch.dtype, batch: int = 8, seq: int = 128) -> tuple[torch.dtype, str]:
    """(dtype, why) of the attention when the base runs in half-precision `dtype` on a CPU: fp32 when a causal
    sdpa forward and backward at the model's head shapes measures faster computed in fp32 (inputs and output
    cast), else `dtype`. On a GPU, or with an fp32 / fp64 base, the attention runs in `dtype`."""
    device = model.get_input_embeddings().weight.device
    if dtype not in (torch.bfloat16, torch.float16) or device.type != "cpu":
        return dtype, "the attention runs in the base's dtype"
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    half = attention_seconds(batch, heads, kv_heads, seq, head_dim, dtype, dtype)
    full = attention_seconds(batch, heads, kv_heads, seq, head_dim, dtype, torch.float32)
    name = dtype_name(dtype)
    shape = (f"causal attention forward+backward at [{batch}, {heads}, {seq}, {head_dim}] takes {half * 1e3:.1f} ms in "
             f"{name}, {full * 1e3:.1f} ms in fp32 with the casts")
    return (torch.float32, f"{shape}: fp32") if full < half else (dtype, f"{shape}: {name}")


def pick_threads(candidates=None, dtype: torch.dtype = torch.float32) -> int:
    """The faster intra-op thread count for this machine right now, set and returned: on a CPU shared with other
    busy processes, OpenMP threads waiting for each other can make 2 threads many times slower than 1, so each
    candidate is timed on a matmul of the demo model's shape and the fastest is kept."""
    cores = os.cpu_count() or 1
    candidates = candidates or sorted({1, cores})
    if len(candidates) == 1:
        torch.set_num_threads(candidates[0])
        return candidates[0]
    a, w = torch.randn(640, 576).to(dtype), torch.randn(576, 1536).to(dtype)
    best: dict[int, float] = {}
    for _ in range(3):
        for n in candidates:
            torch.set_num_threads(n)
            start = time.perf_counter()
            for _ in range(10):
                a @ w
            best[n] = min(best.get(n, float("inf")), time.perf_counter() - start)
    choice = min(best, key=best.get)
    torch.set_num_threads(choice)
    return choice


@dataclass
class ThreadWatch:
    """Re-picks the thread count during a run: a phase that started while the machine was busy (or became busy)
    would otherwise keep a bad choice for its whole length. Checking costs nothing per step (one clock read);
    re-timing (about 0.1-0.5 s) happens after `patience` consecutive steps slower than `slowdown` times the
    fastest step seen since the last choice (at most every `min_gap` steps), and every `every` steps whatever the
    step times say: a choice of fewer threads made while another process was busy makes every later step
    slower, so the steps never look slow against the new baseline, and only a periodic re-timing finds out that
    the other process has gone (seen: a demo phase kept 1 thread for its whole length after a 20 s install)."""

    slowdown: float = 1.5
    patience: int = 3
    min_gap: int = 10
    every: int | None = 50
    dtype: torch.dtype = torch.float32
    rechecks: int = 0
    changes: int = 0

    def __post_init__(self):
        self._best = float("inf")
        self._slow = 0
        self._since = 0
        self._last = None

    def step(self, say=None) -> None:
        """Call once per optimiser step (e.g. from the trainer's on_step hook)."""
        now = time.perf_counter()
        if self._last is None:
            self._last = now
            return
        elapsed, self._last = now - self._last, now
        self._since += 1
        self._best = min(self._best, elapsed)
        self._slow = self._slow + 1 if elapsed > self.slowdown * self._best else 0
        slowed = self._slow >= self.patience and self._since >= self.min_gap
        if slowed or (self.every is not None and self._since >= self.every):
            before = torch.get_num_threads()
            after = pick_threads(dtype=self.dtype)
            self.rechecks += 1
            if after != before:
                self.changes += 1
                if say is not None:
                    why = (f"steps slowed to {elapsed:.2f} s (best {self._best:.2f} s)" if slowed else
                           f"periodic re-check after {self._since} steps")
                    say(f"[threads] {why}: {before} -> {after} threads")
            self._best, self._slow, self._since = float("inf"), 0, 0
            self._last = time.perf_counter()
