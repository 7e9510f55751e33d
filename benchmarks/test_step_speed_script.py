"""benchmarks/step_speed.py still runs (on a 2-layer model, one repeat): the step table is measured with it."""
import step_speed


def test_step_speed_script_runs_on_a_tiny_model(capsys):
    result = step_speed.main(["--tiny", "--repeats", "1", "--batch", "2", "--seq", "12", "--backends", "eager",
                              "--in-process"])
    steps = {(row["step"], row["dtype"]) for row in result["rows"]}
    assert ("frozen base", "bfloat16") in steps and ("pill stage 2", "float32") in steps
    assert result["meta"]["step_flops"] > 0 and "| step |" in capsys.readouterr().out


def test_step_speed_script_measures_each_row_in_its_own_process(capsys):
    result = step_speed.main(["--tiny", "--repeats", "1", "--batch", "2", "--seq", "12", "--backends", "eager",
                              "--methods", "pill", "--dtypes", "float32"])
    assert result["meta"]["isolated"]
    assert [(row["step"], row["dtype"]) for row in result["rows"]] == [("frozen base", "float32"),
                                                                       ("pill stage 2", "float32")]
    assert all(row["median_s"] > 0 for row in result["rows"])
