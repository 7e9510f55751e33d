"""Registers the compiled extension pill_kernels._C as the "cpp" (C++ CPU kernels) and "cuda" backends.

The extension is optional: when it is not built, nothing is registered here and asking for "cpp" or "cuda"
raises `dispatch.BackendUnavailableError` saying how to build it. Its ops (namespace ``pill_kernels_C``,
schemas in csrc/op_schemas.h) take the eager backend's arguments; a backward returns an empty tensor for the
gradient of an absent optional input, which the wrappers below turn back into None.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from . import dispatch


class SourceTreeImportWarning(UserWarning):
    """pill_kernels was imported from a source checkout whose compiled extension is not built."""


def source_checkout_note() -> str | None:
    """Where this import came from a source checkout without a built extension, what that means and what to do
    (as numpy says when imported from its source tree); else None. Run from a clone's root, `python -c "import
    pill_kernels"` imports the clone, not the installed package, because Python puts the current directory
    first on sys.path: without this note a complete install reads as a failed build."""
    package = Path(__file__).resolve().parent
    root = package.parent
    if not ((root / "setup.py").is_file() and (root / "csrc").is_dir()):
        return None
    note = f"pill_kernels was imported from the source checkout {root}, whose compiled extension is not built"
    installed = installed_elsewhere(package)
    if installed:
        note += (f"; the pill-kernels installed at {installed} is hidden by it (Python puts the current directory "
                 f"first on sys.path). Import from another directory to use the installed package")
    else:
        note += ". Build it in place with `pip install --no-build-isolation -e .`, or install the package and " \
                "import it from another directory"
    return note + " (PILL_KERNELS_SKIP_EXT=1 silences this for a deliberate pure-Python use)."


def installed_elsewhere(package: Path) -> str | None:
    """The directory of an installed pill_kernels package other than `package`, if any."""
    from importlib import metadata

    for dist in metadata.distributions(name="pill-kernels"):
        try:
            candidate = Path(str(dist.locate_file("pill_kernels"))).resolve()
        except (OSError, NotImplementedError):
            continue
        if candidate.is_dir() and candidate != package:
            return str(candidate)
    return None


try:
    from . import _C  # noqa: F401  (loading the library registers the pill_kernels_C ops)
except ImportError as _exc:
    IMPORT_ERROR: str | None = str(_exc)
    SOURCE_CHECKOUT_NOTE = source_checkout_note()
    if SOURCE_CHECKOUT_NOTE and os.environ.get("PILL_KERNELS_SKIP_EXT") != "1":
        warnings.warn(SOURCE_CHECKOUT_NOTE, SourceTreeImportWarning, stacklevel=2)
else:
    IMPORT_ERROR = None
    SOURCE_CHECKOUT_NOTE = None


def _has_kernel(name: str, dispatch_key: str, namespace: str = "pill_kernels_C") -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{namespace}::{name}", dispatch_key)


def only_on(device_type: str):
    def unavailable_reason(device: torch.device) -> str | None:
        if device.type != device_type:
            return f"its kernels run on {device_type} tensors, not {device.type}"
        return None

    return unavailable_reason


def _none_if_empty(grad: torch.Tensor, present) -> torch.Tensor | None:
    return grad if present is not None else None


class CompiledOp(NamedTuple):
    """An op's wrappers around the extension's ops: `name` is its forward's in ``torch.ops.<namespace>``; the
    optional training pair (dispatch.Kernel.forward_saving / backward_from_saved) is registered for a device
    only where the extension has a kernel for `saving_name` there."""
    namespace: str
    name: str
    forward: Callable
    backward: Callable
    saving_name: str | None = None
    forward_saving: Callable | None = None
    backward_from_saved: Callable | None = None

    def saving_pair(self, dispatch_key: str) -> dict:
        if self.saving_name is None or not _has_kernel(self.saving_name, dispatch_key, self.namespace):
            return {}
        return {"forward_saving": self.forward_saving, "backward_from_saved": self.backward_from_saved}


def compiled_kernels(namespace: str = "pill_kernels_C") -> dict[str, CompiledOp]:
    """op -> its wrappers (`CompiledOp`).

    The namespace is pill_kernels_C for the extension; the tests pass the CPU emulation of the CUDA kernels'
    namespace (tests/cuda_emulation/) to run the models through these same wrappers on a machine without a GPU.
    """
    def ops():
        return getattr(torch.ops, namespace)

    def routed_glu_forward(x, w_down, w_gate, w_up, expert_ids, norm_weight, eps):
        return ops().routed_glu_adapter_forward(x, w_down, w_gate, w_up, expert_ids, norm_weight, eps)

    def routed_glu_backward(grad_y, x, w_down, w_gate, w_up, expert_ids, norm_weight, eps):
        dx, dwd, dwg, dwu, dnw = ops().routed_glu_adapter_backward(
            grad_y, x, w_down, w_gate, w_up, expert_ids, norm_weight, eps)
        return dx, dwd, dwg, dwu, _none_if_empty(dnw, norm_weight)

    def routed_glu_forward_saving(x, w_down, w_gate, w_up, expert_ids, norm_weight, eps):
        return tuple(ops().routed_glu_adapter_forward_saving(x, w_down, w_gate, w_up, expert_ids, norm_weight, eps))

    def routed_glu_backward_from_saved(grad_y, uv, x, w_down, w_gate, w_up, expert_ids, norm_weight, eps):
        dx, dwd, dwg, dwu, dnw = ops().routed_glu_adapter_backward_from_saved(
            grad_y, uv, x, w_down, w_gate, w_up, expert_ids, norm_weight, eps)
        return dx, dwd, dwg, dwu, _none_if_empty(dnw, norm_weight)

    def soft_forward(x, w_down, b_down, w_up, b_up, routing_weights, dropout_mask, norm_weight, eps, scale):
        return ops().soft_routed_adapter_forward(
            x, w_down, b_down, w_up, b_up, routing_weights, dropout_mask, norm_weight, eps, scale)

    def soft_backward(grad_y, x, w_down, b_down, w_up, b_up, routing_weights, dropout_mask, norm_weight, eps,
                      scale):
        *grads, dnw = ops().soft_routed_adapter_backward(
            grad_y, x, w_down, b_down, w_up, b_up, routing_weights, dropout_mask, norm_weight, eps, scale)
        return (*grads, _none_if_empty(dnw, norm_weight))

    def gate_forward(x, w_gate, v, image_mask):
        return ops().modality_gate_forward(x, w_gate, v, image_mask)

    def gate_backward(grad_v, x, w_gate, v, image_mask):
        return tuple(ops().modality_gate_backward(grad_v, x, w_gate, v, image_mask))

    return {
        "routed_glu_adapter": CompiledOp(namespace, "routed_glu_adapter_forward", routed_glu_forward,
                                         routed_glu_backward, "routed_glu_adapter_forward_saving",
                                         routed_glu_forward_saving, routed_glu_backward_from_saved),
        "soft_routed_adapter": CompiledOp(namespace, "soft_routed_adapter_forward", soft_forward, soft_backward),
        "modality_gate": CompiledOp(namespace, "modality_gate_forward", gate_forward, gate_backward),
    }


if IMPORT_ERROR is None:
    for _op, _compiled in compiled_kernels().items():
        if _has_kernel(_compiled.name, "CPU"):
            # No auto_skip_reason: the C++ kernels measured at least as fast as eager for every op and pass
            # (benchmarks/RESULTS.md, "CPU (2-core CI machine)").
            dispatch.register(_op, "cpp", _compiled.forward, _compiled.backward, unavailable_reason=only_on("cpu"),
                              **_compiled.saving_pair("CPU"))
        if _has_kernel(_compiled.name, "CUDA"):
            # Hand-written CUDA kernels compete with the Triton ones: auto takes them only where measured faster.
            dispatch.register(_op, "cuda", _compiled.forward, _compiled.backward, unavailable_reason=only_on("cuda"),
                              auto_needs_measurement=True, **_compiled.saving_pair("CUDA"))
