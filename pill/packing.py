"""Sequence packing: several training examples per row, each attending only to itself.

A padded batch spends a share of every step on padding that grows with the spread of the examples' lengths
(ScienceQA / LLaVA prompts vary several-fold). A packed batch places the examples one after another in rows of
at most ``max_length`` tokens (greedy first fit, in the batch's order) and marks each token with its example:

- ``sequence_ids`` [R, W]: the example of each token, numbered over the batch in row-major order; -1 for the
  padding at the end of a row (which forms a run of its own, attends only to itself and is never supervised);
- ``position_ids`` [R, W]: restarting at 0 for each example, as the example would see alone;
- ``labels`` [R, W]: each example's own labels; an example's first token is never a target (the previous
  token belongs to another example);
- per-example inputs in the same numbering: ``sequence_modality`` [N] (LLaMA-Adapter V2, LaVIN), LLaMA-Adapter
  V2's ``image_features`` [N, tokens, C]; the placeholder methods' features follow the placeholders in row-major
  order, as unpacked.

The model (`MultimodalLlamaForCausalLM.forward(sequence_ids=...)`) turns these into a block-diagonal causal mask
for the attention implementation, per-token routing (LaVIN), per-example prompts (LLaMA-Adapter V2) and the
segments of the fused gated-attention kernel, which skips key blocks of other examples. A packed batch gives
every example the logits, loss and gradients it has alone (tests/test_packing.py).

Packing changes the layout of a micro-batch, not its content: the trainer packs the same examples an unpacked
step would run, so the optimiser sees the same loss (the mean over the step's supervised tokens) and the same
data order, and resume is unchanged.
"""
from __future__ import annotations

from typing import Callable

import torch

from pill_kernels.reference import segment_starts

from .data import IGNORE, Collator, Example
from .families import Family


def first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into rows of at most `capacity` tokens: each item goes into the first row
    with room for it, in the given order (deterministic: the same lengths give the same rows)."""
    if not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"the packing capacity must be a positive number of tokens, got {capacity!r}")
    rows: list[list[int]] = []
    fill: list[int] = []
    for index, length in enumerate(lengths):
        if length > capacity:
            raise ValueError(f"example {index} has {length} tokens, more than max_length {capacity}: it cannot be "
                             f"packed")
        for row, used in enumerate(fill):
            if used + length <= capacity:
                rows[row].append(index)
                fill[row] += length
                break
        else:
            rows.append([index])
            fill.append(length)
    return rows


class PackedCollator(Collator):
    """Packed batches (see the module docstring): input_ids, labels, position_ids, sequence_ids and the images'
    inputs, the examples in rows of at most `max_length` tokens. The tensor width is the longest row's fill, not
    `max_length`. ``order`` of the last call: the batch's example indices in packed (row-major) order."""

    def __init__(self, pad_token_id: int, features: Callable[[list[str]], torch.Tensor] | None,
                 per_sequence_images: bool = False, *, max_length: int, feature_key: str = "image_features"):
        super().__init__(pad_token_id, features, per_sequence_images, feature_key=feature_key)
        self.max_length = max_length
        self.order: list[int] = []

    def __call__(self, encoded: list[tuple[list[int], list[int]]], examples: list[Example]) -> dict:
        for (ids, _), example in zip(encoded, examples):
            if len(ids) > self.max_length:
                raise ValueError(f"{example.where}: {len(ids)} tokens, more than max_length {self.max_length}: "
                                 f"the example cannot be packed")
        rows = first_fit([len(ids) for ids, _ in encoded], self.max_length)
        width = max(sum(len(encoded[i][0]) for i in row) for row in rows)
        shape = (len(rows), width)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE, dtype=torch.long)
        position_ids = torch.zeros(shape, dtype=torch.long)
        sequence_ids = torch.full(shape, -1, dtype=torch.long)
        number = 0
        for r, row in enumerate(rows):
            column = 0
            for i in row:
                ids, lab = encoded[i]
                end = column + len(ids)
                input_ids[r, column:end] = torch.tensor(ids)
                labels[r, column:end] = torch.tensor(lab)
                labels[r, column] = IGNORE
                position_ids[r, column:end] = torch.arange(len(ids))
                sequence_ids[r, column:end] = number
                number += 1
                column = end
            position_ids[r, column:] = torch.arange(width - column)
        self.order = [i for row in rows for i in row]
        out = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "sequence_ids": sequence_ids}
        out.update(self.image_inputs([examples[i] for i in self.order]))
        return out


def real_tokens(batch: dict) -> int:
    """Tokens of the batch that belong to examples (not padding), packed or not."""
    if "sequence_ids" in batch:
        return int((batch["sequence_ids"] >= 0).sum())
    return int(batch["attention_mask"].sum())


# ---------------------------------------------------------------------------------------------------------------
# What the model derives from sequence_ids
# ---------------------------------------------------------------------------------------------------------------

def positions_in_segments(sequence_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] each token's position inside its own run, from 0."""
    starts = segment_starts(sequence_ids)
    positions = torch.arange(sequence_ids.shape[1], device=sequence_ids.device).expand_as(sequence_ids)
    return positions - torch.where(starts, positions, 0).cummax(-1).values


def check_sequence_ids(sequence_ids, shape: tuple) -> torch.Tensor:
    if not isinstance(sequence_ids, torch.Tensor) or sequence_ids.is_floating_point() or \
            sequence_ids.dtype == torch.bool:
        got = sequence_ids.dtype if isinstance(sequence_ids, torch.Tensor) else type(sequence_ids).__name__
        raise TypeError(f"sequence_ids must be an integer tensor [batch, seq] (each token's example, -1 for "
                        f"padding), got {got}")
    if tuple(sequence_ids.shape) != tuple(shape):
        raise ValueError(f"sequence_ids must have shape [batch, seq] = {tuple(shape)}, got "
                         f"{tuple(sequence_ids.shape)}")
    return sequence_ids.long()


def number_of_examples(sequence_ids: torch.Tensor) -> int:
    return int(sequence_ids.max()) + 1 if sequence_ids.numel() else 0


def packed_model_inputs(config, family: Family, sequence_ids, inputs_embeds, attention_mask, position_ids, labels,
                        cache, use_cache):
    """(sequence ids checked and on the inputs' device, 4D attention mask, position ids, labels) of packed rows:
    causal within each run of equal sequence ids, in the form the configured attention implementation takes
    (boolean for sdpa, additive for eager); positions restarting per example unless given; labels never
    crossing from one example into the next."""
    if attention_mask is not None:
        raise ValueError("packed rows take their structure from sequence_ids: pass attention_mask=None with "
                         "sequence_ids")
    if cache is not None or use_cache:
        raise ValueError("packed rows (sequence_ids) are for training and scoring: pass no cache and "
                         "use_cache=False")
    sequence_ids = check_sequence_ids(sequence_ids, inputs_embeds.shape[:2]).to(inputs_embeds.device)
    starts = segment_starts(sequence_ids)
    if position_ids is None:
        position_ids = positions_in_segments(sequence_ids)
    implementation = config._attn_implementation
    if implementation not in ("sdpa", "eager"):
        raise ValueError(f"packed rows need attn_implementation 'sdpa' or 'eager' (a block-diagonal mask); this "
                         f"model uses {implementation!r}")
    runs = starts.long().cumsum(-1)  # segment numbers
    windows = family.layer_windows(config)
    masks = {window: _block_diagonal_mask(runs, window, implementation, inputs_embeds.dtype)
             for window in set(windows)}
    if len(masks) == 1:
        mask = masks[windows[0]]
    else:  # Qwen's full and sliding layers: the model hands each layer the mask of its type
        mask = {layer_type: masks[window] for layer_type, window in zip(config.layer_types, windows)}
    if labels is not None:
        labels = labels.masked_fill(starts.to(labels.device), IGNORE)
    return sequence_ids, mask, position_ids, labels


def _block_diagonal_mask(runs: torch.Tensor, window: int | None, implementation: str, dtype: torch.dtype):
    """[R, 1, W, W]: causal within each run (and within `window` positions), boolean for sdpa, additive for
    eager."""
    seq = runs.shape[1]
    positions = torch.arange(seq, device=runs.device)
    distance = positions[:, None] - positions[None, :]
    causal = (distance >= 0) & (distance < window) if window else distance >= 0
    allowed = (causal & (runs[:, :, None] == runs[:, None, :]))[:, None]
    if implementation == "sdpa":
        return allowed
    dtype = torch.promote_types(dtype, torch.float32)
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed,
                                                                                      torch.finfo(dtype).min)


def per_example_any(sequence_ids: torch.Tensor, flags: torch.Tensor | None, count: int) -> torch.Tensor:
    """[count] True for the examples with any flagged token (e.g. an image token)."""
    result = torch.zeros(count, dtype=torch.bool, device=sequence_ids.device)
    if flags is None:
        return result
    real = sequence_ids >= 0
    return result.index_put((sequence_ids[real],), flags.to(torch.bool)[real], accumulate=True)


def row_examples(sequence_ids: torch.Tensor) -> torch.Tensor:
    """[B, G] the examples of each row in order (G: the most any row holds), -1 in unused slots."""
    starts = segment_starts(sequence_ids) & (sequence_ids >= 0)
    slot = starts.long().cumsum(-1) - 1
    width = max(int(starts.sum(-1).max()), 1) if starts.numel() else 1
    slots = torch.full((sequence_ids.shape[0], width), -1, dtype=torch.long, device=sequence_ids.device)
    rows = torch.arange(sequence_ids.shape[0], device=sequence_ids.device)[:, None].expand_as(sequence_ids)
    slots[rows[starts], slot[starts]] = sequence_ids[starts]
    return slots
