"""The method registry (`pill.methods`): every method is found by name and injects itself through its record,
and no module outside `pill/methods/` decides anything by a method's name."""
import re
from pathlib import Path

import pytest

import pill
from pill.methods import METHODS, get_method
from conftest import IMAGE_TOKEN, VISION_DIM, make_llama

PACKAGE = Path(pill.__file__).parent


@pytest.mark.parametrize("name", ["pill", "lavin", "llama_adapter_v2"])
def test_each_method_injects_through_its_registry_record(name):
    method = get_method(name)
    assert method.config_class.method == name
    small = {"llama_adapter_v2": {"visual_heads": 4, "visual_blocks": 1}}.get(name, {})  # VISION_DIM = 24
    model = method.inject(make_llama(), method.config_class(**small), vision_dim=VISION_DIM,
                          image_token_id=IMAGE_TOKEN if method.image_placeholders else None)
    assert isinstance(model, pill.MultimodalLlamaForCausalLM)
    assert model.multimodal.method == name
    assert (model.multimodal.image_token_id is not None) == method.image_placeholders


def test_an_unknown_method_is_an_error_naming_the_argument():
    with pytest.raises(ValueError, match=r"run\.yaml: method must be one of \['pill', 'lavin', 'llama_adapter_v2'\]"):
        get_method("lora", where="run.yaml: method")


def test_no_module_outside_the_methods_tests_a_method_name():
    names = "|".join(METHODS)
    comparison = re.compile(rf"""(==|!=|\bin\b)\s*\(?\s*["']({names})["']|["']({names})["']\s*(==|!=)""")
    offenders = [f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}"
                 for path in sorted(PACKAGE.rglob("*.py")) if "methods" not in path.parts
                 for number, line in enumerate(path.read_text().splitlines(), 1) if comparison.search(line)]
    assert not offenders, "method names decided outside pill/methods:\n" + "\n".join(offenders)


@pytest.mark.parametrize("name", ["pill", "lavin", "llama_adapter_v2"])
def test_each_demo_lr_scale_names_parameters_of_its_phase(name):
    """`pill demo`'s per-phase learning-rate factors (Method.demo_settings) must name parameters that the phase
    trains, on the method's demo configuration; the trainer would refuse them otherwise, minutes into a run."""
    from pill.demo import DemoSettings
    from pill.trainer import TrainConfig, parameter_groups

    method = get_method(name)
    settings = DemoSettings(**method.demo_settings)
    model = method.inject(make_llama(), method.config_class(**method.demo_config), vision_dim=VISION_DIM,
                          image_token_id=IMAGE_TOKEN if method.image_placeholders else None)
    for stage, lr_scale in ((1, settings.stage1_lr_scale), (method.config_class.stages[-1], settings.stage2_lr_scale)):
        pill.set_stage(model, stage)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        groups = parameter_groups(params, TrainConfig(stage=stage, lr_scale=lr_scale))
        assert sum(len(g["params"]) for g in groups) == len(params)
        for group in groups:
            for p in group["params"]:
                param_name = next(n for n, q in params.items() if q is p)
                want = max((f for part, f in lr_scale.items() if part in param_name), default=1.0)
                assert group["lr_scale"] == want, param_name
