"""The trainer: one stage of a method over a list of examples, with the PILL recipe's optimiser, adapter-only
checkpoints and exact resume.

Recipe (docs/methods.md, "Training recipe"): AdamW betas (0.9, 0.95), weight decay 0.02 on matrices only
(timm's param_groups_weight_decay leaves biases and norms undecayed), lr = blr * effective batch / 256 unless lr
is given, linear warmup then half-cycle cosine, loss on answer tokens only (the mean over every supervised token
of the optimiser step, however it is split into micro-batches).

Checkpoints (``<output_dir>/checkpoint-<step>/``): the adapter (`pill.save_adapter`), the optimiser state
flattened into safetensors + JSON (no pickle), the RNG state and the step, which fixes the data position: the
order of each epoch is a permutation drawn from (seed, epoch) alone. Each checkpoint is written into a hidden
staging directory and renamed into place, so a killed run leaves complete checkpoints only, and `resume=True`
continues from the newest one to the same parameters an uninterrupted run reaches.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from .checkpoint import DTensor, full_tensor, save_adapter, shard_like
from .files import read_json, read_safetensors, replace_directory
from .data import IGNORE, Collator, Example, PromptFormatter
from .machine import DTYPE_CHOICES, choose_attention_dtype, choose_compute_dtype, dtype_name
from .methods import get_method
from .packing import PackedCollator, real_tokens
from .model import (adapter_parameters, compute_dtype, enable_gradient_checkpointing, multimodal_of,
                    set_compute_dtype, set_stage, upcast_half)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainConfig:
    """One training stage. lr: absolute learning rate; when None, lr = blr * batch_size * grad_accum * world / 256
    (the seed's rule). warmup_steps, when None, is warmup_ratio of the steps. epochs sets the length unless
    max_steps is given. save_every: checkpoint every N optimiser steps (0: only at the end). packing: each
    micro-batch's examples packed into rows of at most the prompt's max_length tokens instead of padded to the
    longest (`pill.packing`): the same examples and loss per step, less padding. dtype: the frozen
    base's compute dtype, "float32", "bfloat16", "auto" (bf16 on a GPU, fp32 on a CPU) or "fastest" (bf16 also on
    a CPU whose bf16 GEMMs measure enough faster at the model's shapes: `pill.machine.choose_compute_dtype`); the
    adapters stay fp32 either way (`pill.set_compute_dtype`); bf16 is its earlier name (true / false / "auto").
    lr_scale: {name part: factor}, the learning rate (and its schedule) multiplied by factor for the trainable
    parameters whose names contain the part (the largest factor where several match), e.g.
    ``{"projector.blocks": 0.1}`` (`pill demo`'s LLaMA-Adapter V2 keeps its visual block slow so that caption
    training does not erase what it passes on). distributed: how several processes (torchrun) share the work:
    "ddp" replicates the model on every rank; "fsdp" shards every parameter over the ranks, the frozen base
    included (FSDP2 `fully_shard` per decoder layer and at the root); a single process ignores it.
    gradient_checkpointing: recompute each decoder layer's activations in the backward instead of keeping them
    (non-reentrant): the activation memory of one layer instead of all, for one more forward per layer; the same
    gradients."""

    stage: int = 1
    output_dir: str = "runs/pill"
    lr: float | None = None
    blr: float = 1e-3
    min_lr: float = 0.0
    weight_decay: float = 0.02
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int | None = None
    warmup_ratio: float = 0.03
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    max_grad_norm: float | None = None
    seed: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 1
    dtype: str = "auto"
    bf16: str | bool | None = None
    progress: bool = True
    distributed: str = "ddp"
    packing: bool = False
    lr_scale: dict = dataclasses.field(default_factory=dict)
    gradient_checkpointing: bool = False

    def __post_init__(self):
        for name in ("batch_size", "grad_accum", "log_every", "keep_checkpoints"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"train.{name} must be a positive integer, got {value!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise ValueError(f"train.max_steps must be a positive integer, got {self.max_steps!r}")
        if not isinstance(self.save_every, int) or self.save_every < 0:
            raise ValueError(f"train.save_every must be a non-negative integer, got {self.save_every!r}")
        if self.epochs <= 0:
            raise ValueError(f"train.epochs must be positive, got {self.epochs}")
        if self.bf16 is not None:
            if self.bf16 not in ("auto", True, False):
                raise ValueError(f"train.bf16 must be 'auto', true or false, got {self.bf16!r}")
            legacy = {True: "bfloat16", False: "float32", "auto": "auto"}[self.bf16]
            if self.dtype not in ("auto", legacy):
                raise ValueError(f"train.bf16={self.bf16!r} contradicts train.dtype={self.dtype!r}; set dtype only")
            self.dtype = legacy
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"train.dtype must be one of {DTYPE_CHOICES}, got {self.dtype!r}")
        for name in ("packing", "gradient_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"train.{name} must be true or false, got {getattr(self, name)!r}")
        if self.distributed not in ("ddp", "fsdp"):
            raise ValueError(f"train.distributed must be 'ddp' or 'fsdp', got {self.distributed!r}")
        self.betas = tuple(self.betas)
        if not isinstance(self.lr_scale, dict) or not all(
                isinstance(k, str) and k and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                for k, v in self.lr_scale.items()):
            raise ValueError(f"train.lr_scale must map parameter-name parts to positive factors, "
                             f"e.g. {{projector.blocks: 0.1}}, got {self.lr_scale!r}")

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"train: unknown key(s) {unknown}; known keys are {sorted(known)}")
        return cls(**data)


def cosine_lr(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """The seed's schedule (timm / MAE lr_sched): linear warmup, then half-cycle cosine to min_lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def parameter_groups(params: dict[str, torch.nn.Parameter], config: TrainConfig) -> list[dict]:
    """AdamW's groups: weight decay on matrices only, and one group per learning-rate factor of
    ``config.lr_scale`` (each group's ``lr_scale``; every part must name some trainable parameter)."""
    unmatched = [part for part in config.lr_scale if not any(part in name for name in params)]
    if unmatched:
        raise ValueError(f"train.lr_scale: {unmatched} name(s) no parameter trained in stage {config.stage} "
                         f"(e.g. {sorted(params)[:3]})")
    groups: dict[tuple[bool, float], list] = {}
    for name, p in params.items():
        scale = max((f for part, f in config.lr_scale.items() if part in name), default=1.0)
        groups.setdefault((p.ndim >= 2, float(scale)), []).append(p)
    # The plain groups first, in the order this function always gave them (checkpoints name their groups).
    order = sorted(groups, key=lambda key: (key[1] != 1.0, not key[0], key[1]))
    return [{"params": groups[key], "weight_decay": config.weight_decay if key[0] else 0.0, "lr_scale": key[1]}
            for key in order]


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class Trainer:
    """Trains `model` (an injected `pill.MultimodalCausalLM`) on `examples` for `config.stage`.

    features: image identity -> stacked features (e.g. a `pill.vision.FeatureCache` lookup), or preprocessed
    images when the method trains inside the vision tower (`MultimodalAdapter.takes_pixels`,
    `pill.recipe.pixel_lookup`); every example's image_ids must be resolvable before training starts.
    on_step(step, metrics) is called after each optimiser step (a hook for callers; raising in it stops the run
    like a crash would)."""

    def __init__(self, model, formatter: PromptFormatter, examples: list[Example], config: TrainConfig,
                 features: Callable[[list[str]], torch.Tensor] | None = None,
                 on_step: Callable[[int, dict], None] | None = None, find_unused_parameters: bool = False):
        if not examples:
            raise ValueError("Trainer: no training examples")
        self.model = model
        self.formatter = formatter
        self.examples = examples
        self.config = config
        self.on_step = on_step
        mm = multimodal_of(model)
        if features is None and any(ex.images or ex.image_ids for ex in examples):
            raise ValueError("Trainer: the examples have images but no features lookup was given")
        per_sequence = mm.image_token_id is None
        # A method that trains inside the vision tower gets preprocessed images, encoded in the training graph.
        key = "images" if mm.takes_pixels else "image_features"
        self.collator = (PackedCollator(formatter.tokenizer.pad_token_id, features, per_sequence,
                                        max_length=formatter.max_length, feature_key=key) if config.packing
                         else Collator(formatter.tokenizer.pad_token_id, features, per_sequence_images=per_sequence,
                                       feature_key=key))
        # Tokenise everything up front: bad examples fail before any step or checkpoint, and label counts per
        # optimiser step are known before its micro-batches run.
        self.encoded = [formatter.encode(ex) for ex in examples]
        for ex, (_, labels) in zip(examples, self.encoded):
            if all(label == IGNORE for label in labels):
                raise ValueError(f"{ex.where}: no answer tokens to train on")
        self.rank, self.world = _world()
        size = config.batch_size * self.world
        if self.world > 1 and len(examples) < size:
            raise ValueError(f"{len(examples)} examples cannot fill one batch of {config.batch_size} on each of "
                             f"{self.world} processes")
        # Distributed: an epoch's incomplete last batch is dropped, so that every rank has rows to run.
        self.micro_per_epoch = (len(examples) // size) if self.world > 1 else math.ceil(len(examples) / size)
        steps_per_epoch = math.ceil(self.micro_per_epoch / config.grad_accum)
        self.total_steps = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
        self.warmup = (config.warmup_steps if config.warmup_steps is not None
                       else int(round(config.warmup_ratio * self.total_steps)))
        eff_batch = config.batch_size * config.grad_accum * self.world
        self.lr = config.lr if config.lr is not None else config.blr * eff_batch / 256
        set_stage(model, config.stage)
        # Before sharding and before the optimiser: the frozen base is cast once, the adapters stay fp32.
        dtype, self.dtype_reason = choose_compute_dtype(model, config.dtype)
        attention, why = choose_attention_dtype(model, dtype)
        self.dtype_reason += f"; {why}"
        if self.world > 1:  # every rank runs rank 0's choice: "auto" measures per process
            device = model.get_input_embeddings().weight.device
            codes = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
            choice = torch.tensor([codes.index(dtype), codes.index(attention)], device=device)
            torch.distributed.broadcast(choice, src=0)
            if (codes[int(choice[0])], codes[int(choice[1])]) != (dtype, attention):
                dtype, attention = codes[int(choice[0])], codes[int(choice[1])]
                self.dtype_reason = f"rank 0's choice ({self.dtype_reason} here)"
        set_compute_dtype(model, dtype, attention)
        if config.gradient_checkpointing:  # before sharding: FSDP wraps the layers that checkpointing marks
            enable_gradient_checkpointing(model)
        self.fsdp = self.world > 1 and config.distributed == "fsdp"
        if self.fsdp:
            shard_with_fsdp(model)
        # Built after sharding: FSDP replaces every parameter with its shard (a DTensor).
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise ValueError(f"stage {config.stage} has no trainable parameters")
        self.optimizer = torch.optim.AdamW(parameter_groups(self.params, config), lr=self.lr, betas=config.betas)
        self.param_names = {id(p): n for n, p in self.params.items()}
        self.ddp_model = None
        if self.world > 1 and not self.fsdp:
            # Wrapped after set_stage: DDP registers the parameters that require grad when it is built, so the
            # frozen base is neither broadcast every step nor all-reduced.
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [model.device.index] if model.device.type == "cuda" else None
            self.ddp_model = DistributedDataParallel(model, device_ids=device_ids,
                                                     find_unused_parameters=find_unused_parameters)
        device = model.get_input_embeddings().weight.device
        self.device = device
        self.step = 0
        self.output_dir = Path(config.output_dir)

    def distributed_report(self) -> str:
        """How the processes share the model (what FSDP saves in memory per process)."""
        total = sum(p.numel() for p in self.model.parameters())
        if self.world == 1:
            return f"1 process holding all {total:,} parameters"
        if not self.fsdp:
            return f"DDP over {self.world} processes: each holds all {total:,} parameters"
        local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in self.model.parameters())
        return (f"FSDP over {self.world} processes: this one holds {local:,} of the {total:,} parameters "
                f"({local / total:.0%}), the frozen base included")

    # -- data order ------------------------------------------------------------------------------------------
    def micro_batch(self, index: int) -> list[int]:
        """Example indices of global micro-batch `index` (this rank's share): a function of (seed, index) only."""
        epoch, position = divmod(index, self.micro_per_epoch)
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.examples), generator=generator).tolist()
        size = self.config.batch_size * self.world
        chunk = order[position * size:(position + 1) * size]
        return chunk[self.rank::self.world]

    def _batch(self, indices: list[int]) -> dict:
        batch = self.collator([self.encoded[i] for i in indices], [self.examples[i] for i in indices])
        return {k: v.to(self.device) for k, v in batch.items()}

    # -- one step --------------------------------------------------------------------------------------------
    def _loss_sum(self, batch: dict) -> tuple[torch.Tensor, int]:
        """The summed cross-entropy of the batch's supervised tokens and their count. The LM head runs only on
        the positions whose next token is supervised (`MultimodalCausalLM.forward`,
        ``logits_to_keep="supervised"``)."""
        model = self.ddp_model or self.model
        out = model(**batch, logits_to_keep="supervised", use_cache=False)
        loss = F.cross_entropy(upcast_half(out.logits), out.targets, reduction="sum")
        return loss, int(out.targets.numel())

    def train_step(self) -> dict:
        cfg = self.config
        self.model.train()
        micro = [self.micro_batch(self.step * cfg.grad_accum + j) for j in range(cfg.grad_accum)]
        n_tokens = sum(sum(label != IGNORE for label in self.encoded[i][1]) for m in micro for i in m)
        if self.world > 1:
            count = torch.tensor([n_tokens], dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(count)
            n_tokens = int(count.item())
        lr = cosine_lr(self.step, self.total_steps, self.warmup, self.lr, cfg.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        started = time.perf_counter()
        total_loss = 0.0
        seen_tokens = 0
        for j, indices in enumerate(micro):
            batch = self._batch(indices)
            seen_tokens += real_tokens(batch)
            # Gradients are all-reduced (DDP) or reduce-scattered (FSDP) once per optimiser step, after the last
            # micro-batch.
            last = j == len(micro) - 1
            sync = self.ddp_model.no_sync() if self.ddp_model is not None and not last else nullcontext()
            if self.fsdp:
                self.model.set_requires_gradient_sync(last)
            with sync:
                loss_sum, _ = self._loss_sum(batch)
                # DDP and FSDP average gradients over ranks; scaling by world keeps the mean over all tokens.
                (loss_sum * self.world / max(n_tokens, 1)).backward()
            total_loss += float(loss_sum.detach())
        if self.world > 1:
            reduced = torch.tensor([total_loss, seen_tokens], dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(reduced)
            total_loss, seen_tokens = float(reduced[0]), int(reduced[1])
        grad_norm = None
        if cfg.max_grad_norm is not None:
            grad_norm = float(full_tensor(torch.nn.utils.clip_grad_norm_(list(self.params.values()),
                                                                         cfg.max_grad_norm)))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        elapsed = time.perf_counter() - started
        metrics = {"step": self.step, "stage": cfg.stage, "loss": total_loss / max(n_tokens, 1), "lr": lr,
                   "tokens": seen_tokens, "tokens_per_s": seen_tokens / max(elapsed, 1e-9),
                   "step_s": elapsed, "epoch": self.step * cfg.grad_accum / self.micro_per_epoch}
        if grad_norm is not None:
            metrics["grad_norm"] = grad_norm
        return metrics

    # -- the loop ------------------------------------------------------------------------------------------
    def train(self, resume: bool = False) -> dict:
        cfg = self.config
        if resume:
            latest = latest_checkpoint(self.output_dir)
            if latest is not None:
                self.load_checkpoint(latest)
        elif latest_checkpoint(self.output_dir) is not None:
            raise FileExistsError(f"{self.output_dir} already holds checkpoints of a run: pass resume to continue "
                                  f"it, or choose another output_dir")
        if self.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._trim_metrics()
        progress = None
        if cfg.progress and self.rank == 0:
            from tqdm.auto import tqdm

            progress = tqdm(total=self.total_steps, initial=self.step, desc=f"stage {cfg.stage}", unit="step",
                            dynamic_ncols=True, file=sys.stderr)
        metrics: dict = {}
        losses: list[float] = []
        try:
            while self.step < self.total_steps:
                metrics = self.train_step()
                losses.append(metrics["loss"])
                if self.rank == 0 and (self.step % cfg.log_every == 0 or self.step == self.total_steps):
                    with open(self.output_dir / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(metrics) + "\n")
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}",
                                         lr=f"{metrics['lr']:.2e}")
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
                if self.on_step is not None:
                    self.on_step(self.step, metrics)
        finally:
            if progress is not None:
                progress.close()
        self.save_checkpoint()
        adapter = self._adapter_tensors() if self.rank == 0 or self.fsdp else None
        if self.rank == 0:
            save_adapter(self.model, self.output_dir / "adapter",
                         metadata={"stage": cfg.stage, "steps": self.step}, tensors=adapter)
        self._barrier()
        metrics = dict(metrics)
        metrics["recent_loss"] = sum(losses[-10:]) / max(1, len(losses[-10:])) if losses else None
        return metrics

    def _trim_metrics(self) -> None:
        """After a resume, drop logged steps past the checkpoint: they will be run (and logged) again."""
        path = self.output_dir / "metrics.jsonl"
        if not path.is_file():
            return
        kept = [line for line in path.read_text().splitlines() if line.strip()
                and json.loads(line).get("step", 0) <= self.step]
        path.write_text("".join(line + "\n" for line in kept))

    # -- checkpoints ---------------------------------------------------------------------------------------
    def _adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The adapter whole on CPU; under FSDP gathered from every rank's shards (so every rank calls it)."""
        return {name: full_tensor(p) for name, p in adapter_parameters(self.model).items()}

    def save_checkpoint(self) -> Path | None:
        # Rank 0 writes; under FSDP every rank takes part in gathering the shards first.
        if self.rank != 0 and not self.fsdp:
            self._barrier()
            return None
        adapter = self._adapter_tensors()
        tensors, groups = flatten_optimizer_state(self.optimizer, self.param_names)
        if self.rank != 0:
            self._barrier()
            return None
        target = self.output_dir / f"checkpoint-{self.step:07d}"
        self.output_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=self.output_dir))
        try:
            save_adapter(self.model, staging / "adapter", metadata={"stage": self.config.stage, "step": self.step},
                         tensors=adapter)
            tensors["rng.torch"] = torch.get_rng_state()
            if torch.cuda.is_available():
                tensors["rng.cuda"] = torch.cuda.get_rng_state()
            save_file(tensors, str(staging / "trainer_state.safetensors"))
            state = {"step": self.step, "total_steps": self.total_steps, "stage": self.config.stage,
                     "param_groups": groups, "train_config": dataclasses.asdict(self.config),
                     "num_examples": len(self.examples), "world_size": self.world,
                     "compute_dtype": dtype_name(compute_dtype(self.model)),
                     "attention_dtype": dtype_name(multimodal_of(self.model).attention_dtype)}
            with open(staging / "trainer_state.json", "w") as f:
                json.dump(state, f, indent=2)
                f.flush()
                os.fsync(f.fileno())
            with open(staging / "trainer_state.safetensors", "rb+") as f:
                os.fsync(f.fileno())
            replace_directory(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        for old in sorted(checkpoints(self.output_dir))[:-self.config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        self._barrier()
        return target

    def _barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        from .checkpoint import load_adapter

        path = Path(path)
        state = read_json(path / "trainer_state.json", "a trainer checkpoint's state")
        missing = [key for key in ("step", "stage", "num_examples", "world_size", "param_groups") if key not in state]
        if missing:
            raise ValueError(f"{path / 'trainer_state.json'}: missing {missing}: not a complete trainer checkpoint")
        if state["stage"] != self.config.stage:
            raise ValueError(f"{path}: checkpoint of stage {state['stage']}, this run trains stage {self.config.stage}")
        if state["num_examples"] != len(self.examples) or state["world_size"] != self.world:
            raise ValueError(f"{path}: checkpoint of a run over {state['num_examples']} examples on "
                             f"{state['world_size']} process(es); this run has {len(self.examples)} on {self.world}: "
                             f"the data position would not carry over")
        saved = (state.get("compute_dtype"), state.get("attention_dtype"))
        current = (dtype_name(compute_dtype(self.model)),
                   dtype_name(multimodal_of(self.model).attention_dtype))
        if saved[0] is not None and saved != current:
            if self.fsdp:
                raise ValueError(f"{path}: checkpoint trained with the base in {saved[0]} (attention: "
                                 f"{saved[1] or saved[0]}), this run chose {current[0]} ({current[1] or current[0]}); "
                                 f"set train.dtype: {saved[0]} to resume it")
            # A resumed run continues in the dtypes it started with, whatever "auto" measures now.
            set_compute_dtype(self.model, saved[0], saved[1])
            self.dtype_reason = f"resumed in the checkpoint's {saved[0]} (attention: {saved[1] or saved[0]})"
        load_adapter(self.model, path / "adapter", set_saved_stage=False)
        tensors = read_safetensors(path / "trainer_state.safetensors")
        load_optimizer_state(self.optimizer, self.param_names, tensors, state["param_groups"])
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng.cuda"])
        self.step = state["step"]


def shard_with_fsdp(model) -> None:
    """FSDP2 over every process of the default group: each decoder layer is one unit (its parameters are
    gathered just before it runs and freed after), the rest (embeddings, LM head, the method's projector and
    prompts) one more at the root; LaVIN is a single unit (see below). Frozen and trainable parameters are
    sharded alike; gradients exist for the trainable ones only, and only those are reduce-scattered."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(model, FSDPModule):
        raise ValueError("the model is already sharded with FSDP: build a Trainer over a fresh model per run")
    device = model.get_input_embeddings().weight.device
    # FSDP shards what each rank holds and does not broadcast: make the adapters (random-initialised, or loaded
    # per rank) rank 0's everywhere, as DDP does when it wraps.
    with torch.no_grad():
        for p in adapter_parameters(model).values():
            torch.distributed.broadcast(p.data, src=0)
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    # A method whose forward runs layers' weights outside the layers' own forward (LaVIN's modality token) is one
    # unit, sharded at rest and gathered whole for each forward and backward (`Method.fsdp_layer_units`).
    if get_method(multimodal_of(model).method).fsdp_layer_units:
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    root = Path(output_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and CHECKPOINT_RE.match(p.name)
                  and (p / "trainer_state.json").is_file())


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    found = checkpoints(output_dir)
    return found[-1] if found else None


def flatten_optimizer_state(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> tuple[dict, list]:
    """The optimiser's per-parameter tensors keyed "<param name>::<field>" and its param groups as JSON, with
    parameters named instead of numbered."""
    tensors: dict[str, torch.Tensor] = {}
    groups = []
    for group in optimizer.param_groups:
        meta = {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k != "params"}
        meta["params"] = [names[id(p)] for p in group["params"]]
        groups.append(meta)
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if not isinstance(value, torch.Tensor):
                    value = torch.tensor(value)
                tensors[f"{names[id(p)]}::{key}"] = full_tensor(value)
    return tensors, groups


def load_optimizer_state(optimizer: torch.optim.Optimizer, names: dict[int, str], tensors: dict, groups: list) -> None:
    current = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    saved = [g["params"] for g in groups]
    if current != saved:
        raise ValueError("the checkpoint's optimiser covers other parameters than this run trains "
                         f"({sum(map(len, saved))} saved, {sum(map(len, current))} now)")
    state: dict = {}
    index = 0
    new_groups = []
    for group, meta in zip(optimizer.param_groups, groups):
        ids = []
        for p in group["params"]:
            name = names[id(p)]
            fields = {k.split("::", 1)[1]: v for k, v in tensors.items() if k.startswith(name + "::")}
            if isinstance(p, DTensor):
                # Saved whole; each rank keeps the shard of its own parameter shard.
                fields = {k: (shard_like(v, p) if v.shape == p.shape else v) for k, v in fields.items()}
            if fields:
                state[index] = fields
            ids.append(index)
            index += 1
        restored = {k: (tuple(v) if k == "betas" else v) for k, v in meta.items() if k != "params"}
        restored["params"] = ids
        restored["lr_scale"] = group["lr_scale"]  # this run's train.lr_scale (checkpoints before it had none)
        new_groups.append(restored)
    optimizer.load_state_dict({"state": state, "param_groups": new_groups})
