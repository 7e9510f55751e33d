"""Backend choice for the fused ops: "eager" | "triton" | "cuda" | "cpp" | "auto", per call or process-wide.

A backend registers, per op, a forward and a backward implementation plus a predicate saying whether it can
run on a given device. Asking for a backend that is missing or cannot run raises `BackendUnavailableError`
naming the op, the backend and why; nothing falls back silently. "auto" picks, per op and device, the first
backend in `AUTO_PREFERENCE` that can run and that auto may use there (a backend can run somewhere without
being worth picking, e.g. Triton under the CPU interpreter), and `explain()` says which one it picked and why.

"cuda" is the compiled extension's CUDA kernels, "cpp" its C++ CPU kernels.
"""
from __future__ import annotations

import contextlib
import json
import os
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

BACKENDS = ("eager", "triton", "cuda", "cpp")
CHOICES = BACKENDS + ("auto",)
# Fused kernels first; a backend that measures slower than another on some device or op says so through its
# `auto_skip_reason`. eager is always available.
AUTO_PREFERENCE = ("cuda", "triton", "cpp", "eager")


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run this op here."""


@dataclass(frozen=True)
class Kernel:
    forward: Callable
    backward: Callable
    # Returns None when the backend can run on this device, else the reason it cannot.
    unavailable_reason: Callable[[torch.device], str | None]
    # Returns None when "auto" may pick the backend on this device, else why not (it still runs when named).
    auto_skip_reason: Callable[[torch.device], str | None]


_registry: dict[str, dict[str, Kernel]] = {}
_state = threading.local()
_HOW_TO_GET = {
    "triton": "the Triton kernels arrive with the Triton backend; install triton and run on a CUDA GPU",
    "cuda": "build the compiled extension with a CUDA torch: pip install --no-build-isolation .",
    "cpp": "build the compiled extension: pip install --no-build-isolation . (needs a C++ compiler)",
}


def _no_objection(device: torch.device) -> str | None:
    return None


_MEASURED_WINS = os.path.join(os.path.dirname(__file__), "measured_wins.json")


def measured_win_reason(op: str, backend: str) -> Callable[[torch.device], str | None]:
    """An `auto_skip_reason` for a backend that "auto" should pick only where a measurement recorded in the
    repository (measured_wins.json, from benchmarks/RESULTS.md) says it wins: elsewhere it runs when named."""
    with open(_MEASURED_WINS) as f:
        devices = json.load(f).get(op, {}).get(backend, [])

    def reason(device: torch.device) -> str | None:
        if device.type != "cuda":
            return f"auto uses {backend} for {op} only on GPUs where it measured faster"
        name = torch.cuda.get_device_name(device)
        if name in devices:
            return None
        return (f"not measured faster than the alternatives on {name} (benchmarks/RESULTS.md, "
                f"pill_kernels/measured_wins.json); ask for backend={backend!r} by name")

    return reason


def register(op: str, backend: str, forward: Callable, backward: Callable,
             unavailable_reason: Callable[[torch.device], str | None] = _no_objection,
             auto_skip_reason: Callable[[torch.device], str | None] = _no_objection) -> None:
    """Make `backend` an implementation of `op`: `forward` and `backward` take the arguments of the eager
    implementations in ops.py and return the same outputs (None for gradients of absent optional inputs)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _registry.setdefault(op, {})[backend] = Kernel(forward, backward, unavailable_reason, auto_skip_reason)


def _check_choice(backend: str, argument: str = "backend") -> str:
    if backend not in CHOICES:
        raise ValueError(f"{argument} must be one of {CHOICES}, got {backend!r}")
    return backend


def _default_backend() -> str:
    override = getattr(_state, "backend", None)
    if override is not None:
        return override
    return _check_choice(os.environ.get("PILL_KERNELS_BACKEND", "auto"), "PILL_KERNELS_BACKEND")


def get_backend() -> str:
    """The backend used when a call passes none: `use_backend`/`set_backend`, else $PILL_KERNELS_BACKEND, else auto."""
    return _default_backend()


def set_backend(backend: str) -> None:
    """Set the default backend for this thread."""
    _state.backend = _check_choice(backend)


@contextlib.contextmanager
def use_backend(backend: str) -> Iterator[None]:
    """Run the block with `backend` as the default."""
    previous = getattr(_state, "backend", None)
    _state.backend = _check_choice(backend)
    try:
        yield
    finally:
        _state.backend = previous


def explain(op: str, device: torch.device | str, backend: str | None = None) -> tuple[str, str]:
    """(chosen backend, reason) for `op` on `device`; raises BackendUnavailableError for an impossible request."""
    device = torch.device(device)
    requested = _check_choice(backend if backend is not None else _default_backend())
    kernels = _registry.get(op)
    if kernels is None:
        raise KeyError(f"unknown op {op!r}; known ops: {sorted(_registry)}")
    if requested != "auto":
        kernel = kernels.get(requested)
        if kernel is None:
            raise BackendUnavailableError(
                f"backend {requested!r} is not available for op {op!r}: it is not implemented in this build "
                f"({_HOW_TO_GET.get(requested, '')}). Available: {available_backends(op, device)}")
        reason = kernel.unavailable_reason(device)
        if reason is not None:
            raise BackendUnavailableError(f"backend {requested!r} cannot run op {op!r} on {device}: {reason}")
        return requested, "asked for by name"
    skipped = []
    for candidate in AUTO_PREFERENCE:
        kernel = kernels.get(candidate)
        if kernel is None:
            skipped.append(f"{candidate}: not built")
            continue
        reason = kernel.unavailable_reason(device) or kernel.auto_skip_reason(device)
        if reason is None:
            return candidate, "auto: " + ("; ".join(skipped + [f"{candidate}: chosen"]))
        skipped.append(f"{candidate}: {reason}")
    raise BackendUnavailableError(f"no backend can run op {op!r} on {device}: {'; '.join(skipped)}")


def resolve(op: str, device: torch.device | str, backend: str | None = None) -> str:
    """The concrete backend that runs `op` on `device` for the requested (or default) backend."""
    return explain(op, device, backend)[0]


def kernel(op: str, backend: str) -> Kernel:
    return _registry[op][backend]


def available_backends(op: str, device: torch.device | str) -> list[str]:
    device = torch.device(device)
    return [name for name, k in _registry.get(op, {}).items() if k.unavailable_reason(device) is None]


def registered_ops() -> list[str]:
    return sorted(_registry)
