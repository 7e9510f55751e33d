"""pill: PILL, LaVIN and LLaMA-Adapter V2 on Hugging Face LLaMA, Mistral, Qwen2 / Qwen2.5 and Qwen3 models
(`pill.families`), running on pill_kernels' fused ops.

    model = LlamaForCausalLM.from_pretrained(...)
    model = pill.inject_pill(model, pill.PillConfig(adapter_dim=32), vision_dim=768, image_token_id=32000)
    pill.set_stage(model, 1)
    out = model(input_ids=ids, attention_mask=mask, image_features=feats, labels=labels)
    pill.save_adapter(model, "runs/stage1")

Each method's whole definition is one module of `pill.methods`; `pill.methods.get_method(name)` is the registry.
"""
from .checkpoint import load_adapter, load_pretrained_adapter, read_adapter_config, save_adapter
from .methods import LavinConfig, LlamaAdapterV2Config, PillConfig, inject_lavin, inject_llama_adapter_v2, inject_pill
from .model import (MultimodalCausalLM, MultimodalLlamaForCausalLM, adapter_parameters, compute_dtype,
                    enable_gradient_checkpointing, kernel_backend, set_compute_dtype, set_kernel_backend, set_stage,
                    stage_parameters, trainable_parameter_report)

__all__ = [
    "LavinConfig", "LlamaAdapterV2Config", "MultimodalCausalLM", "MultimodalLlamaForCausalLM", "PillConfig",
    "adapter_parameters",
    "compute_dtype", "enable_gradient_checkpointing", "set_compute_dtype",
    "inject_lavin", "inject_llama_adapter_v2", "inject_pill", "kernel_backend", "load_adapter",
    "load_pretrained_adapter", "read_adapter_config", "save_adapter", "set_kernel_backend", "set_stage",
    "stage_parameters", "trainable_parameter_report",
]
