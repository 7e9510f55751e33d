"""What the op modules share: argument checks whose errors name the argument, the eager backend's recomputed
vector-Jacobian product, the conversions between absent optional tensors and the empty tensors custom ops
return for them, and the call features that "auto" matches against measurements."""
from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import torch

Tensor = torch.Tensor
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def reference_vjp(fn: Callable, grad_out: Tensor, args: Sequence, differentiable: Sequence[bool]) -> list:
    """d fn / d args (where differentiable and present) for `grad_out`, one entry per argument (None elsewhere).

    The eager backend of a custom op saves only its inputs, as a fused kernel does, so its backward recomputes
    the reference. torch.func.vjp rather than torch.autograd: op bodies run below the autograd dispatch key."""
    wrt = [i for i, (a, d) in enumerate(zip(args, differentiable)) if d and a is not None]

    def fn_of_differentiable(*diff_args):
        full = list(args)
        for i, a in zip(wrt, diff_args):
            full[i] = a
        return fn(*full)

    _, vjp = torch.func.vjp(fn_of_differentiable, *[args[i] for i in wrt])
    grads = dict(zip(wrt, vjp(grad_out)))
    return [grads.get(i) for i in range(len(args))]


def empty_if_none(t: Optional[Tensor], like: Tensor) -> Tensor:
    """Custom ops cannot return None: an absent gradient (or statistic) travels as an empty tensor."""
    return like.new_empty(0) if t is None else t


def none_if_empty(t: Tensor, present: bool) -> Optional[Tensor]:
    return t if present else None


def checks_enabled() -> bool:
    # Range checks on routing ids read the tensor back to the host; PILL_KERNELS_CHECKS=0 skips them on GPU.
    return os.environ.get("PILL_KERNELS_CHECKS", "1") != "0" and not torch.compiler.is_compiling()


def require_tensor(op: str, name: str, t, *, floating: bool = False) -> Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    return t


def require_shape(op: str, name: str, t: Tensor, expected: tuple, meaning: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{op}: {name} must have shape {meaning} = {tuple(expected)}, got {tuple(t.shape)}")


def require_same(op: str, ref_name: str, ref: Tensor, **others: Optional[Tensor]) -> None:
    for name, t in others.items():
        if t is None:
            continue
        if t.device != ref.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}; move them together")
        if t.is_floating_point() and t.dtype != ref.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; cast the weights to the "
                            f"activation dtype (the pill modules do this)")


def require_mask(op: str, name: str, mask: Tensor, expected: tuple, meaning: str, device) -> Tensor:
    require_tensor(op, name, mask)
    if mask.dtype != torch.bool and (mask.is_floating_point() or mask.is_complex()):
        raise TypeError(f"{op}: {name} must be a bool or integer 0/1 tensor, got {mask.dtype}")
    require_shape(op, name, mask, expected, meaning)
    if mask.device != device:
        raise ValueError(f"{op}: {name} is on {mask.device} but the inputs are on {device}")
    return mask.to(torch.bool)


def require_norm_weight(op: str, norm_weight: Optional[Tensor], hidden: int) -> None:
    if norm_weight is not None:
        require_shape(op, "norm_weight", require_tensor(op, "norm_weight", norm_weight, floating=True),
                      (hidden,), "[D]")


def call_features(*grad_inputs: Optional[Tensor], **sizes) -> dict:
    """The call's features for auto's measured choice (dispatch.SHAPE_FEATURES): which pass runs, and sizes."""
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in grad_inputs)
    return {"pass": "forward_backward" if needs_grad else "forward", **sizes}


def contiguous_or_none(t: Optional[Tensor]) -> Optional[Tensor]:
    return t.contiguous() if t is not None else None
