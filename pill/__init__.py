"""pill: PILL, LaVIN and LLaMA-Adapter V2 on Hugging Face LLaMA models, running on pill_kernels' fused ops.

    model = LlamaForCausalLM.from_pretrained(...)
    model = pill.inject_pill(model, pill.PillConfig(adapter_dim=32), vision_dim=768, image_token_id=32000)
    pill.set_stage(model, 1)
    out = model(input_ids=ids, attention_mask=mask, image_features=feats, labels=labels)
    pill.save_adapter(model, "runs/stage1")
"""
from .checkpoint import load_adapter, load_pretrained_adapter, read_adapter_config, save_adapter
from .config import LavinConfig, LlamaAdapterV2Config, PillConfig
from .model import (MultimodalLlamaForCausalLM, adapter_parameters, inject_lavin, inject_llama_adapter_v2,
                    inject_pill, set_stage, stage_parameters, trainable_parameter_report)

__all__ = [
    "LavinConfig", "LlamaAdapterV2Config", "MultimodalLlamaForCausalLM", "PillConfig", "adapter_parameters",
    "inject_lavin", "inject_llama_adapter_v2", "inject_pill", "load_adapter", "load_pretrained_adapter",
    "read_adapter_config", "save_adapter", "set_stage", "stage_parameters", "trainable_parameter_report",
]
