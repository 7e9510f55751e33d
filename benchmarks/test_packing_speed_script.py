"""benchmarks/packing_speed.py still runs (a 2-layer model, one timed step per layout): the packing table is
measured with it."""
import packing_speed


def test_packing_speed_script_runs_on_a_tiny_model(capsys):
    result = packing_speed.main(["--size", "tiny", "--layers", "2", "--threads", "1", "--batch", "4", "--steps", "1",
                                 "--methods", "pill", "llama_adapter_v2"])
    rows = result["rows"]
    assert {(r["method"], r["packed"]) for r in rows} == {(m, p) for m in ("pill", "llama_adapter_v2")
                                                          for p in (False, True)}
    for packed in (r for r in rows if r["packed"]):
        padded = next(r for r in rows if r["method"] == packed["method"] and not r["packed"])
        assert packed["real_tokens"] == padded["real_tokens"]  # the same examples, laid out differently
        assert packed["computed_tokens"] <= padded["computed_tokens"]
    assert "| packed / padded |" in capsys.readouterr().out
