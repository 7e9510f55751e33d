"""The model directory vLLM serves an adapter from: the base LLM's safetensors weights and tokenizer (linked, not
copied), its config.json naming the PILL architecture, and a copy of the adapter, written in one step."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from ..checkpoint import CONFIG_NAME, WEIGHTS_NAME, read_adapter_config
from ..files import read_json, replace_directory
from ..methods import get_method

SERVED_ARCHITECTURE = "PillLlamaForCausalLM"
ADAPTER_SUBDIR = "pill_adapter"
# Tokenizer and generation files of a Hugging Face checkpoint that vLLM reads beside the weights.
_BASE_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
               "generation_config.json", "chat_template.jinja", "added_tokens.json", "vocab.json", "merges.txt")


class ServingError(ValueError):
    """An adapter or base that cannot be served as asked, with the reason."""


def refusal(record: dict) -> str | None:
    """Why vLLM cannot serve the adapter whose adapter_config.json is `record`, or None (each method's registry
    record says, `Method.vllm_refusal`)."""
    method = get_method(record["pill_type"])
    why = method.vllm_refusal(record["config"])
    return f"this {method.name} adapter is not served through vLLM: {why}" if why else None


def prepare_served_model(adapter_dir: str | os.PathLike, base_dir: str | os.PathLike, output_dir: str | os.PathLike,
                         *, image_tokens: int, image_token_id: int | None = None) -> Path:
    """Write the directory vLLM loads to serve the adapter in `adapter_dir` over the Hugging Face LLaMA in
    `base_dir`, and return it. `image_tokens`: feature rows per image (vLLM profiles memory with dummy images of
    that size). `image_token_id`: the placeholder id in served prompts, when the adapter's lies outside the
    vocabulary (vLLM refuses such ids in prompts); any id works, since the placeholders' embeddings are replaced
    by the projected features, but prompts must not hold it as text.

    Refused by name, with the reason: methods vLLM cannot run exactly (LaVIN, LLaMA-Adapter V2), PILL's
    query-head gates, an adapter trained on a base of another shape."""
    adapter_dir, base_dir, output_dir = Path(adapter_dir), Path(base_dir), Path(output_dir)
    record = read_adapter_config(adapter_dir)
    refused = refusal(record)
    if refused:
        raise ServingError(f"{adapter_dir}: {refused} (docs/serving.md); use `pill generate` / `pill eval`")
    if not isinstance(image_tokens, int) or image_tokens < 1:
        raise ServingError(f"image_tokens must be a positive int (feature rows per image), got {image_tokens!r}")
    base_config = read_json(base_dir / "config.json", "a Hugging Face model configuration")
    weights = sorted(base_dir.glob("*.safetensors"))
    if not weights:
        raise ServingError(f"base_dir: no *.safetensors weights in {base_dir}")
    mismatched = [f"{key}: adapter {value!r}, base {base_config.get(key)!r}"
                  for key, value in record.get("base_model", {}).items() if base_config.get(key) != value]
    if mismatched:
        raise ServingError(f"{adapter_dir} was trained on another base than {base_dir}: " + "; ".join(mismatched))
    vocab = base_config["vocab_size"]
    served_id = record["image_token_id"] if image_token_id is None else image_token_id
    if not 0 <= served_id < vocab:
        raise ServingError(f"the adapter's image token id {served_id} lies outside the base's vocabulary "
                           f"({vocab}), and vLLM refuses such ids in prompts; pass image_token_id= an id inside "
                           f"it that prompts never hold as text (e.g. an added <image> token)")
    config = dict(base_config, architectures=[SERVED_ARCHITECTURE], pill_adapter=ADAPTER_SUBDIR,
                  pill_image_tokens=image_tokens, pill_image_token_id=served_id)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        for path in weights + [base_dir / name for name in _BASE_FILES if (base_dir / name).is_file()]:
            os.symlink(path.resolve(), staging / path.name)
        index = base_dir / "model.safetensors.index.json"
        if index.is_file():
            os.symlink(index.resolve(), staging / index.name)
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        (staging / ADAPTER_SUBDIR).mkdir()
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            shutil.copyfile(adapter_dir / name, staging / ADAPTER_SUBDIR / name)
        replace_directory(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir
