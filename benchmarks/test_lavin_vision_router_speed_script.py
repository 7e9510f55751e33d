"""benchmarks/lavin_vision_router_speed.py still runs (a 2-block tower, a 2-layer LLM, one repeat)."""
import lavin_vision_router_speed


def test_lavin_vision_router_speed_script_runs_on_a_tiny_model(capsys):
    result = lavin_vision_router_speed.main(["--tiny", "--repeats", "1", "--batch", "2", "--seq", "16"])
    assert [row["router_blocks"] for row in result["rows"]] == [0, 2]
    assert all(row["median_s"] > 0 for row in result["rows"]) and "| routers in graph | 2 |" in capsys.readouterr().out
