"""Answering through vLLM's engine in this process (`pill eval --engine vllm`): the prompts training's formatter
builds and the features of the run's feature cache, as the transformers engine gets them, so both engines answer
the same question from the same token ids and the same features; only the model that runs differs."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch

from ..checkpoint import read_adapter_config
from ..data import Example, PromptFormatter
from .model_dir import ServingError, prepare_served_model


class VllmAnswerer:
    """Greedy answers from the adapter in `adapter_dir` served by `vllm.LLM` (fp32 unless `dtype` says
    otherwise; `llm_kwargs` go to `vllm.LLM`). `settings`: `pill.recipe.inference_settings` of the adapter."""

    def __init__(self, adapter_dir: str | os.PathLike, settings: dict, *, served_dir: str | os.PathLike | None = None,
                 dtype: str = "float32", max_images: int = 4, **llm_kwargs):
        from transformers import AutoTokenizer
        from vllm import LLM

        from ..llm import resolve_llm
        from ..vision import build_encoder

        if settings["bits"] is not None:
            raise ServingError(f"{adapter_dir} was trained on a {settings['bits']}-bit base, which vLLM does not "
                               f"serve here yet; use --engine transformers")
        base = resolve_llm(settings["llm"], settings["cache"])
        self.encoder = build_encoder(settings["vision"])
        record = read_adapter_config(Path(adapter_dir))
        self._tmp = None
        if served_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="pill-served-")
            served_dir = Path(self._tmp.name) / "model"
        self.served_dir = prepare_served_model(adapter_dir, base, served_dir, image_tokens=self.encoder.num_tokens)
        tokenizer = AutoTokenizer.from_pretrained(str(base))
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        prompt = settings["prompt"]
        self.adapter_image_id = record["image_token_id"]
        # One token per image: vLLM expands it to the image's placeholders.
        self.formatter = PromptFormatter(tokenizer, image_token_id=self.adapter_image_id, image_tokens=1,
                                         prompt_format=prompt.get("format", "chat"), system=prompt.get("system"),
                                         max_length=prompt.get("max_length", 512))
        self.served_image_id = json.loads((self.served_dir / "config.json").read_text())["pill_image_token_id"]
        self.llm = LLM(model=str(self.served_dir), dtype=dtype, enable_mm_embeds=True,
                       limit_mm_per_prompt={"image": max_images}, **llm_kwargs)

    def request(self, example: Example, features: torch.Tensor | None) -> dict:
        """vLLM's prompt for one example: token ids with one served image token per image, and its features."""
        ids = [self.served_image_id if i == self.adapter_image_id else i for i in self.formatter.encode_prompt(example)]
        if not example.images:
            return {"prompt_token_ids": ids}
        return {"prompt_token_ids": ids, "multi_modal_data": {"image": list(features)}}

    def generate_answers(self, examples: list[Example], features: Callable[[list[str]], torch.Tensor] | None, *,
                         max_new_tokens: int = 32, progress: bool = False) -> list[str]:
        """Greedy answers (decoded text, special tokens removed), as `pill.evaluate.generate_answers`."""
        from vllm import SamplingParams

        requests = [self.request(ex, features(ex.image_ids) if ex.images else None) for ex in examples]
        tokenizer = self.formatter.tokenizer
        # Stop at the tokenizer's end token only, as the transformers engine does (vLLM would also stop at every
        # end token of generation_config.json).
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, ignore_eos=True,
                                stop_token_ids=[tokenizer.eos_token_id], skip_special_tokens=True)
        outputs = self.llm.generate(requests, params, use_tqdm=progress)
        # Decoded as the transformers engine decodes, so equal tokens are equal text.
        return tokenizer.batch_decode([list(o.outputs[0].token_ids) for o in outputs], skip_special_tokens=True)

    def close(self) -> None:
        """Stop vLLM's engine processes and remove the served directory it was given by default."""
        engine_core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if engine_core is not None:
            engine_core.shutdown()
        if self._tmp is not None:
            self._tmp.cleanup()
