"""The model directory vLLM serves an adapter from: the base LLM's safetensors weights (linked, not copied), its
config.json naming the PILL architecture, its tokenizer with `<image>` as one token, the chat template of the
run's prompt format, and a copy of the adapter with its run record, written in one step.

What makes served prompts the training prompts: vLLM renders a chat request with the template written here
(images become `<image>` in the text, before the message's text, as `pill generate` puts them) and tokenizes the
whole text at once, while training's `PromptFormatter` tokenizes the text between image markers piece by piece.
The two agree when `<image>` is a token of its own (the tokenizer then splits the text around it first); where
the base's tokenizer does not have it, the served tokenizer gets it as an added special token. Which id marks
image positions does not matter to the served model (their embeddings are the projected features), so the added
token takes the next free id. `prepare_served_model` checks the agreement on sample conversations and refuses
the directory if the served prompts would differ from the trained ones."""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

from ..checkpoint import CONFIG_NAME, WEIGHTS_NAME, read_adapter_config
from ..files import read_json, replace_directory
from ..methods import get_method

# The served model per base family (`pill.families`); vLLM runs Mistral with its LLaMA model, as its own registry
# does, so a Mistral base is served by the LLaMA one.
SERVED_ARCHITECTURES = {"llama": "PillLlamaForCausalLM", "mistral": "PillLlamaForCausalLM",
                        "qwen2": "PillQwen2ForCausalLM", "qwen3": "PillQwen3ForCausalLM"}
SERVED_ARCHITECTURE = SERVED_ARCHITECTURES["llama"]
ADAPTER_SUBDIR = "pill_adapter"
CHAT_TEMPLATE_NAME = "pill_chat_template.jinja"
IMAGE_MARKER = "<image>"
# Tokenizer and generation files of a Hugging Face checkpoint that vLLM reads beside the weights.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja")
_OTHER_FILES = ("generation_config.json",)


class ServingError(ValueError):
    """An adapter or base that cannot be served as asked, with the reason."""


def refusal(record: dict) -> str | None:
    """Why vLLM cannot serve the adapter whose adapter_config.json is `record`, or None (each method's registry
    record says, `Method.vllm_refusal`)."""
    method = get_method(record["pill_type"])
    why = method.vllm_refusal(record["config"])
    return f"this {method.name} adapter is not served through vLLM: {why}" if why else None


def read_run_record(adapter_dir: Path) -> dict:
    """The adapter's pill_run.json (`pill.recipe.record_run`), or {} when it has none."""
    from ..recipe import RUN_RECORD

    path = adapter_dir / RUN_RECORD
    return read_json(path, "the run record of an adapter") if path.is_file() else {}


def base_from_record(adapter_dir: Path, run: dict) -> Path:
    """The base LLM's checkpoint directory named by the run record (a .gguf or the demo's model converted once)."""
    from ..llm import resolve_llm
    from ..recipe import RUN_RECORD, llm_spec

    if not run.get("llm"):
        raise ServingError(f"{adapter_dir} has no {RUN_RECORD} naming its base LLM: pass the base's directory")
    path, bits = llm_spec({}, run["llm"])
    if bits is not None:
        raise ServingError(f"{adapter_dir} was trained on a {bits}-bit base; serving a quantized base through vLLM "
                           f"is not supported yet, and serving it on the full-precision weights would not be the "
                           f"model that was trained")
    return resolve_llm(path, run.get("cache_dir"))


def chat_template(tokenizer, prompt: dict) -> str:
    """A Jinja chat template that renders a conversation as `PromptFormatter` does with the run's prompt settings
    (format "chat": the tokenizer's template; "plain": "User: ...\\nAssistant: ..."; `system` put first when the
    conversation has none)."""
    prompt_format, system = prompt.get("format", "chat"), prompt.get("system")
    if prompt_format == "chat":
        template = getattr(tokenizer, "chat_template", None)
        if not isinstance(template, str) or not template:
            raise ServingError("prompt format 'chat' needs a tokenizer with a chat template; the base's has none")
    elif prompt_format == "plain":
        template = ("{%- for m in messages -%}"
                    "{%- if m['role'] == 'system' -%}{{ m['content'] }}{{ '\\n\\n' }}"
                    "{%- elif m['role'] == 'user' -%}{{ 'User: ' }}{{ m['content'] }}{{ '\\n' }}"
                    "{%- else -%}{{ 'Assistant: ' }}{{ m['content'] }}{{ eos_token }}{{ '\\n' }}{%- endif -%}"
                    "{%- endfor -%}"
                    "{%- if add_generation_prompt -%}{{ 'Assistant: ' }}{%- endif -%}")
        # The formatter tokenizes a plain prompt with the tokenizer's special tokens (e.g. LLaMA's BOS); vLLM
        # tokenizes a rendered chat without them, so the template writes them.
        with_special = tokenizer("x", add_special_tokens=True)["input_ids"]
        without = tokenizer("x", add_special_tokens=False)["input_ids"]
        start = with_special.index(without[0]) if without and without[0] in with_special else 0
        if with_special[start + len(without):]:
            raise ServingError("prompt format 'plain' with a tokenizer that appends special tokens to a text is not "
                               "served (the chat template cannot reproduce it)")
        if start:
            template = "{{ " + json.dumps(tokenizer.decode(with_special[:start])) + " }}" + template
    else:
        raise ServingError(f"prompt format must be 'chat' or 'plain', got {prompt_format!r}")
    if system is not None:
        template = ("{%- if messages[0]['role'] != 'system' -%}{%- set messages = [{'role': 'system', 'content': "
                    + json.dumps(system) + "}] + messages -%}{%- endif -%}" + template)
    return template


def _probe_conversations() -> list[tuple[str, int]]:
    return [("<image>\nWhat is shown here? Answer with one word.", 1),
            ("Compare <image> with\n<image>: which one is larger, (A) or (B)?", 2),
            ("Hello! Nothing to look at here.", 0)]


def check_served_prompts(base_tokenizer, served_tokenizer, template: str, prompt: dict, adapter_image_id: int,
                         served_image_id: int) -> None:
    """Raise unless the served tokenizer and template turn sample conversations into the token ids training's
    formatter gives them (each image as one token: vLLM expands it to the image's placeholders)."""
    from ..data import Example, PromptFormatter

    formatter = PromptFormatter(base_tokenizer, image_token_id=adapter_image_id, image_tokens=1,
                                prompt_format=prompt.get("format", "chat"), system=prompt.get("system"),
                                max_length=1 << 30)
    for text, images in _probe_conversations():
        messages = [{"role": "user", "content": text}]
        trained = [served_image_id if i == adapter_image_id else i
                   for i in formatter.encode_prompt(Example(messages + [{"role": "assistant", "content": ""}],
                                                            [None] * images, ["probe"] * images))]
        rendered = served_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                        add_generation_prompt=True)
        served = served_tokenizer(rendered, add_special_tokens=False)["input_ids"]
        if served != trained:
            at = next((i for i, (a, b) in enumerate(zip(served, trained)) if a != b), min(len(served), len(trained)))
            raise ServingError(f"the served tokenizer would not give the trained prompts: for {text!r}, training's "
                               f"formatter gives {trained[max(0, at - 3):at + 4]} from token {at}, the served "
                               f"tokenizer {served[max(0, at - 3):at + 4]}")


def served_architecture(base_dir: Path, base_config: dict) -> str:
    """The served architecture of a base (its config.json as a dict), or ServingError naming what vLLM would not
    run as transformers does: another family, or Qwen's per-layer sliding windows (vLLM's Qwen2 / Qwen3 models
    apply one window to every layer or to none; the released Qwen2.5 / Qwen3 configs have no window)."""
    from ..families import UnsupportedBaseError, family_of_config

    model_type = base_config.get("model_type")
    if model_type not in SERVED_ARCHITECTURES:
        raise ServingError(f"{base_dir}: adapters are served on {', '.join(sorted(SERVED_ARCHITECTURES))} bases; "
                           f"this base is {model_type!r}")
    from transformers import AutoConfig

    try:
        config = AutoConfig.for_model(**base_config)
        family = family_of_config(config, str(base_dir))
    except (UnsupportedBaseError, ValueError, TypeError) as error:
        raise ServingError(str(error)) from None
    if family.name in ("qwen2", "qwen3") and any(w is not None for w in family.layer_windows(config)):
        raise ServingError(f"{base_dir} ({family.label}): sliding-window layers (use_sliding_window=true) are not "
                           f"served: vLLM's {family.label} model does not apply transformers' per-layer windows "
                           f"(max_window_layers); use `pill generate` / `pill eval`")
    return SERVED_ARCHITECTURES[model_type]


def prepare_served_model(adapter_dir: str | os.PathLike, base_dir: str | os.PathLike | None,
                         output_dir: str | os.PathLike, *, image_tokens: int | None = None) -> Path:
    """Write the directory vLLM loads to serve the adapter in `adapter_dir` over the Hugging Face LLaMA, Mistral,
    Qwen2 or Qwen3 in `base_dir` (None: the base its pill_run.json names), and return it. `image_tokens`: feature
    rows per image (None: the count of the vision encoder its pill_run.json names).

    Refused by name, with the reason: methods vLLM cannot run exactly (LaVIN, LLaMA-Adapter V2), PILL's
    query-head gates, an adapter trained on a base of another shape or on a 4-bit base, another family or Qwen's
    sliding windows (`served_architecture`), a tokenizer or prompt format whose served prompts would differ from
    the trained ones."""
    from transformers import AddedToken, AutoTokenizer

    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    record = read_adapter_config(adapter_dir)
    refused = refusal(record)
    if refused:
        raise ServingError(f"{adapter_dir}: {refused} (docs/serving.md); use `pill generate` / `pill eval`")
    run = read_run_record(adapter_dir)
    base_dir = base_from_record(adapter_dir, run) if base_dir is None else Path(base_dir)
    if image_tokens is None:
        if not run.get("vision"):
            raise ServingError(f"{adapter_dir} has no run record naming its vision encoder: pass image_tokens")
        from ..vision import build_encoder

        image_tokens = build_encoder(run["vision"]).num_tokens
    if not isinstance(image_tokens, int) or image_tokens < 1:
        raise ServingError(f"image_tokens must be a positive int (feature rows per image), got {image_tokens!r}")
    base_config = read_json(base_dir / "config.json", "a Hugging Face model configuration")
    architecture = served_architecture(base_dir, base_config)
    weights = sorted(base_dir.glob("*.safetensors"))
    if not weights:
        raise ServingError(f"base_dir: no *.safetensors weights in {base_dir}")
    mismatched = [f"{key}: adapter {value!r}, base {base_config.get(key)!r}"
                  for key, value in record.get("base_model", {}).items() if base_config.get(key) != value]
    if mismatched:
        raise ServingError(f"{adapter_dir} was trained on another base than {base_dir}: " + "; ".join(mismatched))

    base_tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    served_tokenizer = copy.deepcopy(base_tokenizer)  # may gain "<image>"; the base's stays training's
    # An added token: the tokenizer splits the text around it before anything else (a word of the vocabulary
    # that merely spells "<image>" would not do).
    add_image_token = IMAGE_MARKER not in served_tokenizer.get_added_vocab()
    if add_image_token:
        served_tokenizer.add_tokens([AddedToken(IMAGE_MARKER, special=True, normalized=False)])
    served_id = served_tokenizer.get_added_vocab()[IMAGE_MARKER]
    prompt = run.get("prompt") or {}
    template = chat_template(base_tokenizer, prompt)
    check_served_prompts(base_tokenizer, served_tokenizer, template, prompt, record["image_token_id"], served_id)
    config = dict(base_config, architectures=[architecture], pill_adapter=ADAPTER_SUBDIR,
                  pill_image_tokens=image_tokens, pill_image_token_id=served_id)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        linked = weights + [base_dir / name for name in _OTHER_FILES + ("model.safetensors.index.json",)]
        if add_image_token:
            served_tokenizer.save_pretrained(staging)
        else:
            linked += [base_dir / name for name in _TOKENIZER_FILES]
        for path in linked:
            if path.is_file():
                os.symlink(path.resolve(), staging / path.name)
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        (staging / CHAT_TEMPLATE_NAME).write_text(template)
        (staging / ADAPTER_SUBDIR).mkdir()
        from ..recipe import RUN_RECORD

        for name in (CONFIG_NAME, WEIGHTS_NAME) + ((RUN_RECORD,) if run else ()):
            shutil.copyfile(adapter_dir / name, staging / ADAPTER_SUBDIR / name)
        replace_directory(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir
