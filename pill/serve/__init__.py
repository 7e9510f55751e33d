"""Serving trained adapters with vLLM, in a room of its own: neither `pill` nor `pill_kernels` imports this
package. vLLM imports it in each of its processes through the `vllm.general_plugins` entry point (setup.py), and
`register` then names the served architecture; `prepare_served_model` (no vLLM needed) writes the model
directory vLLM loads: the base's weights and tokenizer beside a config naming that architecture and a copy of the
adapter. What is served and what is refused: docs/serving.md."""
from .model_dir import SERVED_ARCHITECTURE, SERVED_ARCHITECTURES, ServingError, prepare_served_model

__all__ = ["SERVED_ARCHITECTURE", "SERVED_ARCHITECTURES", "ServingError", "prepare_served_model", "register"]


def register() -> None:
    """vLLM's plugin hook: the PILL-adapted models (one per base family) as architectures, resolved lazily
    (nothing heavy is imported until vLLM loads a model of one of them)."""
    from vllm import ModelRegistry

    for architecture in sorted(set(SERVED_ARCHITECTURES.values())):
        if architecture not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(architecture, f"pill.serve.vllm_model:{architecture}")
