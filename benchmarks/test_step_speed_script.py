"""benchmarks/step_speed.py still runs (on a 2-layer model, one repeat): the step table is measured with it."""
import torch
from transformers import LlamaConfig

import step_speed


def test_step_speed_script_runs_on_a_tiny_model(capsys):
    result = step_speed.main(["--tiny", "--repeats", "1", "--batch", "2", "--seq", "12", "--backends", "eager",
                              "--in-process"])
    steps = {(row["step"], row["dtype"]) for row in result["rows"]}
    assert ("frozen base", "bfloat16") in steps and ("pill stage 2", "float32") in steps
    assert ("frozen base (fp32 residual stream)", "bfloat16") in steps
    assert result["meta"]["step_flops"] > 0 and "| step |" in capsys.readouterr().out


def test_step_speed_script_measures_each_row_in_its_own_process(capsys):
    result = step_speed.main(["--tiny", "--repeats", "1", "--batch", "2", "--seq", "12", "--backends", "eager",
                              "--methods", "pill", "--dtypes", "float32"])
    assert result["meta"]["isolated"]
    assert [(row["step"], row["dtype"]) for row in result["rows"]] == [("frozen base", "float32"),
                                                                       ("pill stage 2", "float32")]
    assert all(row["median_s"] > 0 for row in result["rows"])


def test_step_speed_script_builds_each_familys_block(capsys):
    result = step_speed.main(["--tiny", "--repeats", "1", "--batch", "2", "--seq", "40", "--backends", "eager",
                              "--methods", "pill", "--dtypes", "float32", "--family", "mistral", "--in-process"])
    assert result["meta"]["model"] == "tiny, mistral block"
    assert [row["step"] for row in result["rows"]] == ["frozen base", "pill stage 2"]
    base = step_speed.build_base(step_speed.TINY, family="qwen3")
    assert type(base).__name__ == "Qwen3ForCausalLM" and base.model.layers[0].self_attn.head_dim == 64
    assert step_speed.build_base(step_speed.TINY, family="mistral").config.sliding_window == 32


def test_frozen_base_with_an_fp32_residual_stream_projects_in_bf16_and_adds_in_fp32():
    """The row that stands for the methods' precision recipe: decoder layers return fp32, the projections
    compute in bf16; the plain bf16 row is bf16 throughout."""
    model = step_speed.build_base(step_speed.TINY, attention="sdpa_fp32").to(torch.bfloat16)
    seen = []
    for layer in model.model.layers:
        layer.register_forward_hook(
            lambda module, args, out: seen.append(("layer", (out[0] if isinstance(out, tuple) else out).dtype)))
    model.model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda module, args, out: seen.append(("q_proj", out.dtype)))
    ids, labels, _, _ = step_speed.inputs(LlamaConfig(**step_speed.TINY), 2, 16, 4, 8, 16, True)
    step_speed.frozen_base_step(model, ids, labels, fp32_residual=True)()
    assert seen == [("q_proj", torch.bfloat16), ("layer", torch.float32), ("layer", torch.float32)]
    seen.clear()
    step_speed.frozen_base_step(model, ids, labels)()
    assert seen == [("q_proj", torch.bfloat16), ("layer", torch.bfloat16), ("layer", torch.bfloat16)]
