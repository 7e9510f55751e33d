"""Shared by the op tests of every backend: input makers, the mask matrix, the comparison rule of
docs/correctness.md and the backends to run."""

import pytest
import torch

import pill_kernels as pk

LOW_PRECISION = [torch.bfloat16, torch.float16]
MASK_KINDS = ["all_text", "all_image", "alternating", "one_image", "random"]


def image_mask(kind, tokens):
    if kind == "all_text":
        return torch.zeros(tokens, dtype=torch.bool)
    if kind == "all_image":
        return torch.ones(tokens, dtype=torch.bool)
    if kind == "alternating":
        return torch.arange(tokens) % 2 == 1
    if kind == "one_image":
        mask = torch.zeros(tokens, dtype=torch.bool)
        mask[tokens // 2] = True
        return mask
    return torch.rand(tokens) < 0.3


def assert_matches_reference(out, out_ref_lowp, out_ref_fp64, atol=1e-5, what="output"):
    """The rule of docs/correctness.md, "The low-precision rule": error against the fp64 reference at most 2x the
    reference's own error in that dtype, plus a small slack: `atol` in bf16/fp16, a few fp32 ulps of the output's
    magnitude in fp32. fp64 compares directly."""
    if out.dtype == torch.float64:
        torch.testing.assert_close(out, out_ref_fp64, rtol=1e-10, atol=1e-10, msg=lambda m: f"{what}: {m}")
        return
    err = (out.double() - out_ref_fp64).abs().max().item()
    ref_err = (out_ref_lowp.double() - out_ref_fp64).abs().max().item()
    slack = atol if out.dtype in LOW_PRECISION else 1e-6 * max(1.0, out_ref_fp64.abs().max().item())
    assert err <= 2 * ref_err + slack, (f"{what}: error {err:.3e} > 2 x reference error {ref_err:.3e} + "
                                        f"{slack:.1e}")


def rounded_to(dtype, tensors):
    """Floating tensors rounded to `dtype` and kept in float64 (others unchanged), as a dict or a list: the float64
    ground truth then sees exactly the inputs a low-precision kernel gets, and the error bound measures the
    kernel's arithmetic, not the rounding of its inputs (which on outputs of a few elements can move the answer
    by more than the reference's own error)."""
    def one(t):
        return t.to(dtype).double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
    if isinstance(tensors, dict):
        return {k: one(v) for k, v in tensors.items()}
    return [one(t) for t in tensors]


# ------------------------------------------------------------------------------------------------------
# Definitions written independently of pill_kernels.reference (which the eager backend runs): the op tests
# compare every backend, eager included, against these.
# ------------------------------------------------------------------------------------------------------

def _rms_norm_definition(x, weight, eps):
    xf = x.float() if x.dtype in LOW_PRECISION else x
    return weight * (xf / torch.sqrt((xf * xf).sum(-1, keepdim=True) / x.shape[-1] + eps)).to(x.dtype)


def routed_glu_definition(x, w_down, w_gate, w_up, expert_ids, norm_weight, eps=1e-6):
    """Per token: gather its expert's matrices, y = n + W_up(SiLU(n W_gate) * (n W_down))."""
    n = _rms_norm_definition(x, norm_weight, eps) if norm_weight is not None else x
    ids = expert_ids.long() if expert_ids is not None else torch.zeros(x.shape[0], dtype=torch.long)
    gate = torch.einsum("td,tdr->tr", n, w_gate[ids])
    down = torch.einsum("td,tdr->tr", n, w_down[ids])
    hidden = gate * torch.sigmoid(gate) * down
    return n + torch.einsum("tr,trd->td", hidden, w_up[ids])


def soft_routed_definition(x, w_down, b_down, w_up, b_up, routing_weights, dropout_mask=None, norm_weight=None,
                           eps=1e-6, scale=1.0):
    """LaVIN's router as written in the seed: every expert's up-projection, weighted and summed one by one."""
    n = _rms_norm_definition(x, norm_weight, eps) if norm_weight is not None else x
    z = n @ w_down + b_down
    if dropout_mask is not None:
        z = z * dropout_mask
    return n + scale * sum(routing_weights[:, e:e + 1] * (z @ w_up[e] + b_up[e]) for e in range(w_up.shape[0]))


def modality_gate_definition(x, w_gate, v, image_mask):
    """The seed's MAG: the gated value where the (full-width) mask is set, the value elsewhere."""
    gated = torch.tanh(x @ w_gate)[..., None] * v
    return torch.where(image_mask[:, None, None].expand_as(v), gated, v)


def gated_attention_definition(q, k, v, gate_logits=None, image_mask=None, key_padding_mask=None, prompt_k=None,
                               prompt_v=None, prompt_gate=None, causal=True, scale=None, window=None):
    """Attention with explicit exponentials per (query head, key): probabilities from exp(s - max) / sum over
    the allowed keys (a window: the last `window` positions up to the query's), the image keys' gate applied to
    the probabilities, grouped heads indexed, not repeated."""
    batch, heads, seq_q, head_dim = q.shape
    seq_k, group = k.shape[2], heads // k.shape[1]
    scale = head_dim ** -0.5 if scale is None else scale
    kv_of_head = torch.arange(heads) // group
    keys, values = k[:, kv_of_head], v[:, kv_of_head]
    scores = torch.einsum("bhid,bhjd->bhij", q, keys) * scale
    allowed = torch.ones(batch, 1, seq_q, seq_k, dtype=torch.bool)
    if causal:
        distance = torch.arange(seq_q)[:, None] + seq_k - seq_q - torch.arange(seq_k)[None, :]
        allowed = allowed & (distance >= 0) & (distance < (window or seq_k + 1))
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :].bool()
    top = scores.masked_fill(~allowed, -torch.inf).amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weights = torch.where(allowed, torch.exp(scores - top), torch.zeros_like(scores))
    total = weights.sum(-1, keepdim=True)
    probs = weights / torch.where(total > 0, total, torch.ones_like(total))
    if gate_logits is not None:
        multiplier = torch.where(image_mask[:, None, :].bool(), torch.tanh(gate_logits), torch.ones_like(gate_logits))
        probs = probs * multiplier[:, :, None, :]
    out = torch.einsum("bhij,bhjd->bhid", probs, values)
    if prompt_k is not None:
        prompt_scores = torch.einsum("bhid,bhjd->bhij", q, prompt_k[:, kv_of_head]) * scale
        prompt_probs = torch.exp(prompt_scores - prompt_scores.amax(-1, keepdim=True))
        prompt_probs = prompt_probs / prompt_probs.sum(-1, keepdim=True)
        out = out + torch.tanh(prompt_gate)[None, :, None, None] * torch.einsum(
            "bhij,bhjd->bhid", prompt_probs, prompt_v[:, kv_of_head])
    return out


def routed_inputs(tokens, hidden=40, rank=5, experts=2, norm=True, dtype=torch.float64, mask="random"):
    x = torch.randn(tokens, hidden, dtype=dtype)
    w_down = 0.3 * torch.randn(experts, hidden, rank, dtype=dtype)
    w_gate = 0.3 * torch.randn(experts, hidden, rank, dtype=dtype)
    w_up = 0.3 * torch.randn(experts, rank, hidden, dtype=dtype)
    ids = image_mask(mask, tokens).long() if experts == 2 else torch.randint(0, experts, (tokens,))
    norm_weight = (1 + 0.2 * torch.randn(hidden, dtype=dtype)) if norm else None
    return x, w_down, w_gate, w_up, ids, norm_weight


def soft_inputs(tokens=9, hidden=12, rank=4, experts=2, dtype=torch.float64, norm=True, dropout=True):
    return dict(
        x=torch.randn(tokens, hidden, dtype=dtype), w_down=0.3 * torch.randn(hidden, rank, dtype=dtype),
        b_down=0.1 * torch.randn(rank, dtype=dtype), w_up=0.3 * torch.randn(experts, rank, hidden, dtype=dtype),
        b_up=0.1 * torch.randn(experts, hidden, dtype=dtype),
        routing_weights=torch.softmax(torch.randn(tokens, experts, dtype=dtype), -1),
        dropout_mask=((torch.rand(tokens, rank) > 0.25).to(dtype) / 0.75) if dropout else None,
        norm_weight=(1 + 0.2 * torch.randn(hidden, dtype=dtype)) if norm else None)


def attention_inputs(batch=2, heads=4, kv_heads=2, seq_q=6, seq_k=6, head_dim=8, prompts=3, gate=True,
                     prompt=True, padding=True, dtype=torch.float64):
    t = lambda *s: torch.randn(*s, dtype=dtype)  # noqa: E731
    pad = None
    if padding:
        pad = torch.ones(batch, seq_k, dtype=torch.bool)
        pad[0, :2] = False  # left padding: the first queries of row 0 see no key
        pad[-1, -1] = False
    return dict(q=t(batch, heads, seq_q, head_dim), k=t(batch, kv_heads, seq_k, head_dim),
                v=t(batch, kv_heads, seq_k, head_dim),
                gate_logits=t(batch, heads, seq_k) if gate else None,
                image_mask=(torch.rand(batch, seq_k) < 0.5) if gate else None, key_padding_mask=pad,
                prompt_k=t(batch, kv_heads, prompts, head_dim) if prompt else None,
                prompt_v=t(batch, kv_heads, prompts, head_dim) if prompt else None,
                prompt_gate=t(heads) if prompt else None)


# Every backend that can run on CPU here; a backend that is not built for an op is skipped there, and
# test_backends_expected_in_ci fails when CI lacks one it should have.
CPU_BACKENDS = ["eager", "triton", "cpp"]


def require_backend(op, backend, device="cpu"):
    if backend not in pk.available_backends(op, device):
        try:
            pk.explain(op, device, backend)
        except pk.BackendUnavailableError as exc:
            pytest.skip(str(exc))
