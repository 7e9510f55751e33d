"""Machine-dependent choices (pill.machine) and the half-precision base they lead to (pill.set_compute_dtype):
the choice rule with the measurements replaced by given numbers, the bf16 base with fp32 adapters for every
method, resuming in the checkpoint's dtype, and the thread re-check on a simulated clock."""
import pytest
import torch

import pill
import pill.machine as machine
from pill.trainer import TrainConfig, Trainer, latest_checkpoint
from test_models import batch_for, make_model
from trainer_testing import mc_examples, tiny_llm
from test_trainer import formatter_for, inject


class _Config:
    def __init__(self, hidden, intermediate):
        self.hidden_size, self.intermediate_size = hidden, intermediate


class _Model:
    """What choose_compute_dtype reads of a model: its embedding's dtype and device, and its widths."""

    def __init__(self, dtype=torch.float32, hidden=576, intermediate=1536):
        self.config = _Config(hidden, intermediate)
        self._embedding = torch.nn.Embedding(2, 2).to(dtype)

    def get_input_embeddings(self):
        return self._embedding


@pytest.mark.parametrize("fp32_ms, bf16_ms, hidden, expected", [  # dtype "fastest" on a CPU
    (19.9, 4.4, 576, torch.bfloat16),   # the measurement on the development VM
    (10.0, 8.0, 576, torch.float32),    # bf16 faster, but not by BF16_MIN_SPEEDUP
    (19.9, 4.4, 40, torch.float32),     # too narrow for a GEMM rate to carry over to the step
])
def test_auto_dtype_follows_the_measured_gemms(monkeypatch, fp32_ms, bf16_ms, hidden, expected):
    times = {torch.float32: fp32_ms / 1e3, torch.bfloat16: bf16_ms / 1e3}
    monkeypatch.setattr(machine, "gemm_seconds", lambda tokens, hidden, width, dtype, device="cpu": times[dtype])
    dtype, why = machine.choose_compute_dtype(_Model(hidden=hidden), "fastest")
    assert dtype == expected and why.startswith("fastest:")
    if hidden >= machine.BF16_MIN_HIDDEN:
        assert f"{bf16_ms:.1f} ms in bf16, {fp32_ms:.1f} ms in fp32" in why


def test_explicit_dtypes_and_a_float64_base_are_kept_and_auto_trains_in_fp32_on_a_cpu(monkeypatch):
    monkeypatch.setattr(machine, "gemm_seconds", lambda *a, **k: pytest.fail("measured without need"))
    dtype, why = machine.choose_compute_dtype(_Model())
    assert dtype == torch.float32 and "fastest" in why
    assert machine.choose_compute_dtype(_Model(), "float32")[0] == torch.float32
    assert machine.choose_compute_dtype(_Model(), "bfloat16")[0] == torch.bfloat16
    assert machine.choose_compute_dtype(_Model(torch.float64))[0] == torch.float64
    assert machine.choose_compute_dtype(_Model(torch.float64), "fastest")[0] == torch.float64
    with pytest.raises(ValueError, match="dtype must be one of"):
        machine.choose_compute_dtype(_Model(), "fp8")


def test_train_config_reads_the_earlier_bf16_name():
    assert TrainConfig(bf16=True).dtype == "bfloat16" and TrainConfig(bf16=False).dtype == "float32"
    with pytest.raises(ValueError, match="contradicts train.dtype"):
        TrainConfig(bf16=True, dtype="float32")
    with pytest.raises(ValueError, match="train.dtype must be one of"):
        TrainConfig(dtype="half")


@pytest.mark.parametrize("method", ["pill", "pill_query_head", "lavin", "llama_adapter_v2"])
def test_a_bf16_base_with_fp32_adapters_trains_evaluates_and_generates(method):
    """After set_compute_dtype(bf16): the frozen base is bf16 but for the LM head (tied to the input embedding
    here), every adapter parameter (LLaMA-Adapter V2's tuned norms and biases included) stays fp32 and gets fp32
    gradients, the fp32 logits stay within bf16 rounding of the fp32 model's, and generation runs."""
    model = make_model(method, dtype=torch.float32)
    ids, features, extra = batch_for(method)
    features = features.float()
    with torch.no_grad():
        reference = model(input_ids=ids, image_features=features, **extra).logits
    trained = pill.adapter_parameters(model)
    pill.set_compute_dtype(model, "bfloat16")
    assert pill.compute_dtype(model) == torch.bfloat16
    for name, p in model.named_parameters():
        full_precision = name in trained or p is model.lm_head.weight
        assert p.dtype == (torch.float32 if full_precision else torch.bfloat16), name
    out = model(input_ids=ids, image_features=features, labels=ids, logits_to_keep="supervised", **extra)
    out.loss.backward()
    grads = [p.grad for p in model.trainable_parameters()]
    assert grads and all(g is not None and g.dtype == torch.float32 and g.isfinite().all() for g in grads)
    with torch.no_grad():
        logits = model(input_ids=ids, image_features=features, **extra).logits
    assert logits.dtype == torch.float32
    assert (logits - reference).abs().max() < 0.05 * reference.abs().max()
    generated = model.generate(ids, image_features=features, max_new_tokens=3, do_sample=False, **extra)
    assert generated.shape == (ids.shape[0], ids.shape[1] + 3)


def test_a_resumed_run_keeps_the_dtype_it_started_with(tmp_path, monkeypatch):
    """A run that chose bf16 and is resumed where "auto" would now choose fp32 continues in bf16."""
    examples, lookup = mc_examples(6)
    choices = iter([(torch.bfloat16, "auto: measured"), (torch.float32, "auto: measured")])
    monkeypatch.setattr("pill.trainer.choose_compute_dtype", lambda model, requested: next(choices))
    cfg = dict(stage=2, output_dir=str(tmp_path), lr=1e-3, batch_size=3, save_every=1, progress=False)
    model = inject("pill", tiny_llm())
    Trainer(model, formatter_for(model), examples, TrainConfig(max_steps=1, **cfg), features=lookup).train()
    assert pill.compute_dtype(model) == torch.bfloat16
    resumed = inject("pill", tiny_llm())
    trainer = Trainer(resumed, formatter_for(resumed), examples, TrainConfig(max_steps=2, **cfg), features=lookup)
    assert pill.compute_dtype(resumed) == torch.float32
    trainer.train(resume=True)
    assert latest_checkpoint(tmp_path).name == "checkpoint-0000002"
    assert pill.compute_dtype(resumed) == torch.bfloat16 and "resumed" in trainer.dtype_reason


def test_the_thread_watch_also_rechecks_periodically_so_a_choice_made_under_load_does_not_stick(monkeypatch):
    """A phase re-timed to 1 thread while another process was busy runs uniformly slower afterwards: no step
    looks slow against the new baseline, so only the periodic re-check (every `every` steps) brings the second
    core back once the load has gone."""
    clock = [0.0]
    threads = iter([1, 2])  # the re-check under load picks 1; the periodic one, after the load, picks 2
    picks = []
    monkeypatch.setattr(machine.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(machine, "pick_threads", lambda dtype=None: picks.append(clock[0]) or next(threads))
    monkeypatch.setattr(machine.torch, "get_num_threads", lambda: 2 if len(picks) != 1 else 1)
    watch = machine.ThreadWatch(slowdown=1.5, patience=3, min_gap=5, every=20)
    said = []

    def steps(seconds):
        for s in seconds:
            clock[0] += s
            watch.step(say=said.append)

    steps([0.0] + [1.0] * 6 + [4.0] * 3)  # load arrives: three slow steps -> re-timed, 1 thread chosen
    assert len(picks) == 1 and watch.changes == 1
    steps([1.6] * 19)  # 1 thread on a quiet machine: steady, nothing looks slow
    assert len(picks) == 1
    steps([1.6])  # the 20th step since the last choice: re-timed, back to 2 threads
    assert len(picks) == 2 and watch.changes == 2 and "periodic re-check after 20 steps" in said[-1]


def test_the_thread_watch_repicks_only_after_sustained_slow_steps(monkeypatch):
    clock = [0.0]
    picks = []
    monkeypatch.setattr(machine.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(machine, "pick_threads", lambda dtype=None: picks.append(clock[0]) or 1)
    watch = machine.ThreadWatch(slowdown=1.5, patience=3, min_gap=5, every=None)

    def steps(seconds):
        for s in seconds:
            clock[0] += s
            watch.step()

    steps([0.0] + [1.0] * 6)     # the first call only starts the clock; then six 1 s steps
    steps([2.0, 2.0, 1.0, 2.0])  # slow steps that are not consecutive enough: no re-check
    assert picks == []
    steps([2.0, 2.0, 2.0])       # three in a row at 2x the best step
    assert len(picks) == 1 and watch.rechecks == 1
    steps([2.0] * 4)             # a new baseline after the re-check: 2 s is now the best step
    assert len(picks) == 1


@pytest.mark.parametrize("method", ["pill", "pill_query_head", "lavin", "llama_adapter_v2"])
@pytest.mark.parametrize("attention", [None, torch.float32])
def test_the_attention_runs_in_its_own_dtype_under_a_bf16_base(method, attention, monkeypatch):
    """set_compute_dtype(bf16, attention_dtype=fp32): every attention call (transformers' sdpa path and the
    gated-attention op) gets fp32 inputs, outside autocast; without it, bf16. Results stay bf16 downstream."""
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, v, *args, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    model = make_model(method, dtype=torch.float32)
    pill.set_compute_dtype(model, torch.bfloat16, attention_dtype=attention)
    ids, features, extra = batch_for(method)
    out = model(input_ids=ids, image_features=features.float(), labels=ids, logits_to_keep="supervised", **extra)
    out.loss.backward()
    want = attention or torch.bfloat16
    assert seen and set(seen) == {(want, want, want)}
    assert out.logits.dtype == torch.float32  # the LM head's (FullPrecisionLinear)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.trainable_parameters())


@pytest.mark.parametrize("method", ["pill", "lavin", "llama_adapter_v2"])
def test_the_lm_head_and_projector_compute_in_fp32_under_a_bf16_base(method):
    """Under a bf16 base the logits are the final hidden states times the LM head's weight to fp32 accuracy, and
    the projector's output is its fp32 weights applied to the features to fp32 accuracy: both computed here in
    float64 from the captured inputs (bf16 arithmetic would be off by ~1e-2 relative). float32 again restores a
    plain nn.Linear head."""
    model = make_model(method, dtype=torch.float32)
    pill.set_compute_dtype(model, torch.bfloat16)
    ids, features, extra = batch_for(method)
    features = features.float()
    captured = {}
    model.model.norm.register_forward_hook(lambda module, args, out: captured.update(hidden=out))
    with torch.no_grad():
        logits = model(input_ids=ids, image_features=features, **extra).logits
        expected = captured["hidden"].double() @ model.lm_head.weight.double().T
        assert (logits.double() - expected).abs().max() < 1e-4 * expected.abs().max()
        projector = model.multimodal.projector
        projector_input = {}
        projector.register_forward_hook(lambda module, args, out: projector_input.update(x=args[0], out=out))
        with pill.model.compute_autocast(model):
            model.multimodal.project(features)
        assert projector_input["x"].dtype == torch.float32 and projector_input["out"].dtype == torch.float32
        expected = projector.double()(features.double())
        projector.float()
        assert (projector_input["out"].double() - expected).abs().max() < 1e-5 * expected.abs().max()
    pill.set_compute_dtype(model, torch.float32)
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.float32
