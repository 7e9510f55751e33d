"""benchmarks/training_memory.py still runs, and the 4-bit base it builds in memory is the one
`pill.llm.load_llm(bits=4)` loads through transformers (the memory table stands for what users get)."""
import pytest
import torch
from transformers import LlamaForCausalLM

import training_memory

pytest.importorskip("bitsandbytes", reason="the 4-bit base needs bitsandbytes (the lowmem extra)")


def packed(model):
    return {name: module for name, module in model.named_modules() if type(module).__name__ == "Linear4bit"}


def test_the_in_memory_nf4_base_equals_the_one_transformers_loads(tmp_path):
    from pill.llm import quantization_config

    full = training_memory.build_base(training_memory.SHAPES["tiny"], "cpu", "full", torch.float32)
    full.save_pretrained(tmp_path)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=quantization_config(4),
                                              device_map="cpu").eval()
    built = training_memory.quantize_to_nf4(
        training_memory.build_base(training_memory.SHAPES["tiny"], "cpu", "full", torch.float32), torch.float32).eval()
    theirs, ours = packed(loaded), packed(built)
    assert sorted(theirs) == sorted(ours) and len(ours) == 7 * full.config.num_hidden_layers
    for name, module in ours.items():
        reference = theirs[name]
        assert torch.equal(module.weight.data, reference.weight.data), name
        assert torch.equal(module.weight.quant_state.absmax, reference.weight.quant_state.absmax), name
        assert module.weight.quant_state.blocksize == reference.weight.quant_state.blocksize
        assert module.weight.quant_type == reference.weight.quant_type == "nf4"
    ids = torch.randint(0, full.config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(built(ids).logits, loaded(ids).logits, rtol=0, atol=0)


def test_training_memory_script_runs_on_a_tiny_model(capsys):
    result = training_memory.main(["--shape", "tiny", "--seq", "48", "--supervised", "8", "--methods", "pill",
                                   "lavin", "--checkpointing", "on", "--in-process"])
    rows = {(r["method"], r["base"]): r for r in result["rows"]}
    assert set(rows) == {(m, b) for m in ("pill", "lavin") for b in ("full", "4bit")}
    for (method, base), row in rows.items():
        assert row["peak_MiB"] >= row["before_MiB"] > 0 and row["checkpointing"]
        assert row["trainable_params_M"] > 0
    for method in ("pill", "lavin"):  # packed projections: an eighth of fp32's bytes, plus their scales
        assert rows[method, "4bit"]["frozen_weights_MiB"] < rows[method, "full"]["frozen_weights_MiB"]
    assert "| pill (2) | 4-bit NF4 | on |" in capsys.readouterr().out
