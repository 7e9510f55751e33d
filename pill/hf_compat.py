"""The few places where supported transformers releases differ, behind one name each.

transformers renamed the KV cache argument of models and decoder layers from ``past_key_values`` to ``cache``
(5.24; the old name still works on the models, with a deprecation warning). The method layers and the
multimodal model accept it under either name and pass it on under the name the installed LlamaForCausalLM
declares, read from its documented forward signature.
"""
from __future__ import annotations

import inspect

from transformers import LlamaForCausalLM

CACHE_NAMES = ("cache", "past_key_values")

# The name LlamaForCausalLM.forward takes the cache under in the installed transformers.
CAUSAL_LM_CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters \
    else "past_key_values"


def take_cache(kwargs: dict, given=None):
    """The KV cache passed under either name (removed from `kwargs`); both at once is an error."""
    found = [(name, kwargs.pop(name)) for name in CACHE_NAMES if kwargs.get(name) is not None]
    if given is not None:
        found.append(("past_key_values", given))
    if len(found) > 1 and any(cache is not found[0][1] for _, cache in found[1:]):
        raise ValueError(f"two different KV caches were passed ({', '.join(n for n, _ in found)}); pass one")
    for name in CACHE_NAMES:
        kwargs.pop(name, None)
    return found[0][1] if found else None
