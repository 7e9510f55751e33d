"""Registers the compiled extension pill_kernels._C as the "cpp" (C++ CPU kernels) and "cuda" backends.

The extension is optional: when it is not built, nothing is registered here and asking for "cpp" or "cuda"
raises `dispatch.BackendUnavailableError` saying how to build it. Its ops (namespace ``pill_kernels_C``,
schemas in csrc/op_schemas.h) take the eager backend's arguments; a backward returns an empty tensor for the
gradient of an absent optional input, which the wrappers below turn back into None.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from . import dispatch

try:
    from . import _C  # noqa: F401  (loading the library registers the pill_kernels_C ops)
except ImportError as _exc:
    IMPORT_ERROR: str | None = str(_exc)
else:
    IMPORT_ERROR = None


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
