"""benchmarks/step_speed.py still runs (on a 2-layer model, one repeat): the step table is measured with it."""
import step_speed


def test_step_speed_script_runs_on_a_tiny_model(capsys):
    result = step_speed.main(["--tiny", "--repeats", "1", "--batch", "2", "--seq", "12", "--backends", "eager"])
    steps = {(row["step"], row["dtype"]) for row in result["rows"]}
    assert ("frozen base", "bfloat16") in steps and ("pill stage 2", "float32") in steps
    assert result["meta"]["step_flops"] > 0 and "| step |" in capsys.readouterr().out
