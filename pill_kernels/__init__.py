"""pill-kernels: fused kernels for parameter-efficient vision-language adaptation of LLaMA models.

Public functional API (each a `torch.library` custom op in the ``pill_kernels`` namespace, differentiable,
dispatched to the backend chosen per call or with `use_backend` / `set_backend`):

- `routed_glu_adapter`: PILL's hard-routed GLU adapter experts (MoMAE; E=1 is the attention adapter), with an
  optional fused RMSNorm in front;
- `soft_routed_adapter`: LaVIN's soft-routed RepAdapter (shared down, E up-experts, per-token mixing weights);
- `modality_gate`: PILL's modality attention gate on image tokens' values;
- `gated_attention`: causal attention with a per-query-head value gate and LLaMA-Adapter V2's prompt branch.

`pill_kernels.reference` holds the plain-PyTorch ground truth of each op.
"""
from . import dispatch, reference
from .dispatch import (BackendUnavailableError, available_backends, explain, get_backend, set_backend,
                       use_backend)
from .ops import gated_attention, modality_gate, routed_glu_adapter, soft_routed_adapter
from . import compiled  # noqa: E402,F401  (registers the compiled extension's backends when it is built)

try:
    import triton as _triton  # noqa: F401
except ImportError:  # e.g. macOS or Windows CPU installs: the eager (and compiled) backends still work
    _triton = None
if _triton is not None:
    from . import triton as _triton_backend  # noqa: F401  (registers the "triton" backend)

__version__ = "0.1.0"


def extension_info() -> str:
    """What the compiled extension pill_kernels._C was built with, or why it is absent."""
    if compiled.IMPORT_ERROR is not None:
        info = f"pill_kernels._C is not built ({compiled.IMPORT_ERROR}); only the eager backend is available"
        return info + (f". {compiled.SOURCE_CHECKOUT_NOTE}" if compiled.SOURCE_CHECKOUT_NOTE else "")
    import torch

    return torch.ops.pill_kernels_C.build_info()


__all__ = [
    "BackendUnavailableError", "available_backends", "dispatch", "explain", "extension_info", "gated_attention",
    "get_backend", "modality_gate", "reference", "routed_glu_adapter", "set_backend", "soft_routed_adapter",
    "use_backend",
]
