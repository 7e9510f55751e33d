"""Backend choice for the fused ops: "eager" | "triton" | "cuda" | "cpp" | "auto", per call or process-wide.

A backend registers, per op, a forward and a backward implementation plus a predicate saying whether it can
run on a given device. Asking for a backend that is missing or cannot run raises `BackendUnavailableError`
naming the op, the backend and why; nothing falls back silently. "auto" picks, per op and device, the first
backend in `AUTO_PREFERENCE` that can run and that auto may use there (a backend can run somewhere without
being worth picking, e.g. Triton under the CPU interpreter), and `explain()` says which one it picked and why.

Backends registered with ``auto_needs_measurement=True`` (the Triton attention kernel, the CUDA kernels, which
compete with fast alternatives) are picked by "auto" only from measurements: per op, device name and shape,
`measured_wins.json` (written by ``benchmarks/run.py --record``; $PILL_KERNELS_MEASUREMENTS points to another
file, e.g. one recorded on your own GPU) holds the median time of each backend at benchmarked shapes. A call
takes the fastest runnable backend of the nearest measured shape with the same discrete features (pass, dtype,
variant) and each size within 4x of the call's; with no such measurement those backends are left out.

"cuda" is the compiled extension's CUDA kernels, "cpp" its C++ CPU kernels.
"""
from __future__ import annotations

import contextlib
import json
import math
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
    # "auto" picks it only where a recorded measurement at a nearby shape says it is the fastest.
    auto_needs_measurement: bool = False
    # Optional training pair: forward_saving returns (output, saved activations), and backward_from_saved takes
    # the saved activations right after the output's gradient, then the forward's arguments, instead of
    # recomputing them. The op modules use the pair when a backend registers it.
    forward_saving: Callable | None = None
    backward_from_saved: Callable | None = None


_registry: dict[str, dict[str, Kernel]] = {}
_state = threading.local()
_HOW_TO_GET = {
    "triton": "the Triton kernels arrive with the Triton backend; install triton and run on a CUDA GPU",
    "cuda": "build the compiled extension with a CUDA torch: pip install --no-build-isolation .",
    "cpp": "build the compiled extension: pip install --no-build-isolation . (needs a C++ compiler)",
}


def _no_objection(device: torch.device) -> str | None:
    return None


_MEASUREMENTS = os.path.join(os.path.dirname(__file__), "measured_wins.json")
# Per op: features a measurement must match exactly, and sizes matched to the nearest (each within NEAR_LIMIT).
SHAPE_FEATURES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "routed_glu_adapter": (("pass", "dtype"), ("tokens", "hidden", "rank")),
    "soft_routed_adapter": (("pass", "dtype"), ("tokens", "hidden", "rank")),
    "modality_gate": (("pass", "dtype"), ("tokens", "hidden")),
    "gated_attention": (("pass", "dtype", "variant"), ("batch", "seq", "heads", "head_dim")),
}
NEAR_LIMIT = 4.0
_measurements_cache: dict[str, dict] = {}


def measurements_path() -> str:
    return os.environ.get("PILL_KERNELS_MEASUREMENTS") or _MEASUREMENTS


def load_measurements(path: str | None = None) -> dict:
    """{op: {device name: [{feature: value, ..., "median_ms": {backend: ms}}]}} from `path` (default:
    `measurements_path()`), read once per path."""
    path = path or measurements_path()
    if path not in _measurements_cache:
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"PILL_KERNELS_MEASUREMENTS: no file {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"measurements file {path} is not valid JSON: {e}") from None
        _measurements_cache[path] = {op: entries for op, entries in data.items() if not op.startswith("_")}
    return _measurements_cache[path]


def nearest_measurement(op: str, device_name: str, shape: dict, measurements: dict | None = None) -> dict | None:
    """The recorded measurement of `op` on `device_name` that matches `shape`'s exact features and is nearest in
    its sizes (sum of |log ratio|, each size within NEAR_LIMIT times), or None."""
    exact, near = SHAPE_FEATURES.get(op, ((), ()))
    entries = (measurements if measurements is not None else load_measurements()).get(op, {}).get(device_name, [])
    best, best_distance = None, math.inf
    for entry in entries:
        if any(entry.get(k) != shape.get(k) for k in exact):
            continue
        ratios = [abs(math.log(shape[k] / entry[k])) for k in near
                  if shape.get(k) and entry.get(k)]
        if len(ratios) != len(near) or max(ratios, default=0.0) > math.log(NEAR_LIMIT):
            continue
        if sum(ratios) < best_distance:
            best, best_distance = entry, sum(ratios)
    return best


_nearest_memo: dict[tuple, dict | None] = {}


def _nearest_for_call(op: str, device_name: str, shape: dict) -> dict | None:
    """`nearest_measurement` memoised per call signature: "auto" asks it on every op call of every layer."""
    try:
        key = (measurements_path(), id(load_measurements()), op, device_name, tuple(sorted(shape.items())))
        hash(key)
    except TypeError:  # symbolic sizes under torch.compile: not hashable, look up directly
        return nearest_measurement(op, device_name, shape)
    if key not in _nearest_memo:
        _nearest_memo[key] = nearest_measurement(op, device_name, shape)
    return _nearest_memo[key]


def _describe(entry: dict, op: str) -> str:
    exact, near = SHAPE_FEATURES.get(op, ((), ()))
    return ", ".join(f"{k}={entry[k]}" for k in exact + near if k in entry)


def register(op: str, backend: str, forward: Callable, backward: Callable,
             unavailable_reason: Callable[[torch.device], str | None] = _no_objection,
             auto_skip_reason: Callable[[torch.device], str | None] = _no_objection,
             auto_needs_measurement: bool = False, forward_saving: Callable | None = None,
             backward_from_saved: Callable | None = None) -> None:
    """Make `backend` an implementation of `op`: `forward` and `backward` take the arguments of the eager
    implementations in ops/<op>.py and return the same outputs (None for gradients of absent optional inputs).
    `forward_saving` and `backward_from_saved` (both or neither): see `Kernel`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if (forward_saving is None) != (backward_from_saved is None):
        raise ValueError(f"{op}/{backend}: forward_saving and backward_from_saved go together; got only one")
    _registry.setdefault(op, {})[backend] = Kernel(forward, backward, unavailable_reason, auto_skip_reason,
                                                   auto_needs_measurement, forward_saving, backward_from_saved)


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


def explain(op: str, device: torch.device | str, backend: str | None = None,
            shape: dict | None = None) -> tuple[str, str]:
    """(chosen backend, reason) for `op` on `device` (and, for "auto", the call's `shape`: the features of
    `SHAPE_FEATURES[op]`); raises BackendUnavailableError for an impossible request."""
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
    measured_only = [b for b in AUTO_PREFERENCE if b in kernels and kernels[b].auto_needs_measurement]
    entry = None
    if measured_only and device.type == "cuda" and shape is not None:
        device_name = torch.cuda.get_device_name(device)
        entry = _nearest_for_call(op, device_name, shape)
    if entry is not None:
        for candidate, ms in sorted(entry.get("median_ms", {}).items(), key=lambda item: item[1]):
            kernel = kernels.get(candidate)
            if kernel is None or kernel.unavailable_reason(device) is not None:
                continue
            if kernel.auto_needs_measurement or kernel.auto_skip_reason(device) is None:
                return candidate, (f"auto: measured fastest ({ms:.3g} ms) on {device_name} at the nearest recorded "
                                   f"shape ({_describe(entry, op)}; {measurements_path()})")
    skipped = []
    for candidate in AUTO_PREFERENCE:
        kernel = kernels.get(candidate)
        if kernel is None:
            skipped.append(f"{candidate}: not built")
            continue
        reason = kernel.unavailable_reason(device) or kernel.auto_skip_reason(device)
        if reason is None and kernel.auto_needs_measurement:
            reason = (f"auto uses {candidate} for {op} only where measured fastest, and no measurement recorded "
                      f"for this device near this shape ({measurements_path()}); ask for backend={candidate!r} "
                      f"by name")
        if reason is None:
            return candidate, "auto: " + ("; ".join(skipped + [f"{candidate}: chosen"]))
        skipped.append(f"{candidate}: {reason}")
    raise BackendUnavailableError(f"no backend can run op {op!r} on {device}: {'; '.join(skipped)}")


def resolve(op: str, device: torch.device | str, backend: str | None = None, shape: dict | None = None) -> str:
    """The concrete backend that runs `op` on `device` for the requested (or default) backend."""
    return explain(op, device, backend, shape)[0]


def kernel(op: str, backend: str) -> Kernel:
    return _registry[op][backend]


def available_backends(op: str, device: torch.device | str) -> list[str]:
    device = torch.device(device)
    return [name for name, k in _registry.get(op, {}).items() if k.unavailable_reason(device) is None]


def registered_ops() -> list[str]:
    return sorted(_registry)
