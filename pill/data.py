"""Datasets, prompt formatting and collation.

An `Example` is a conversation (system / user / assistant messages) whose text marks each image with
``<image>``, plus the images themselves, and for multiple-choice data the options and the right one. Sources:
- LLaVA-style conversation JSONL (one JSON object per line; a JSON list works too):
  ``{"id": ..., "image": "path" | "images": [...], "conversations": [{"from": "human", "value": "<image>\\n..."},
  {"from": "gpt", "value": "..."}]}`` (or ``"messages": [{"role", "content"}]``); optional ``"choices"``,
  ``"answer"`` (letter or index) and ``"category"`` make it a multiple-choice item for `pill eval`.
- ScienceQA's layout: ``problems.json`` + ``pid_splits.json`` + ``images/<split>/<pid>/image.png``.

`PromptFormatter` renders a conversation with the tokenizer's chat template (or a plain "User:/Assistant:"
format), expands each ``<image>`` into the image's placeholder tokens (PILL, LaVIN) or drops the marker
(LLaMA-Adapter V2, whose images enter through its prompts), and labels the assistant turns only (plus their end
token). `Collator` left-pads a batch, so every row's answer ends at the last position and the loss needs the
logits of the last few positions only.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

IMAGE_MARKER = "<image>"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
IGNORE = -100


class DataError(ValueError):
    """Bad input data; the message names the file and line (or item)."""


@dataclass
class Example:
    messages: list[dict]                      # [{"role": "system"|"user"|"assistant", "content": str}]
    images: list[Any] = field(default_factory=list)       # Path or in-memory image, in marker order
    image_ids: list[str] = field(default_factory=list)    # cache identities, parallel to images
    choices: list[str] | None = None
    answer: int | None = None                 # index into choices
    category: dict[str, str] = field(default_factory=dict)
    where: str = ""                           # "file:line" for messages

    def check(self) -> None:
        markers = sum(m["content"].count(IMAGE_MARKER) for m in self.messages)
        if markers != len(self.images):
            raise DataError(f"{self.where}: {len(self.images)} image(s) but {markers} {IMAGE_MARKER} placeholder(s) "
                            f"in the text")
        if not self.messages or self.messages[-1]["role"] != "assistant":
            raise DataError(f"{self.where}: the conversation must end with an assistant turn")
        for m in self.messages:
            if m["role"] not in ("system", "user", "assistant") or not isinstance(m["content"], str):
                raise DataError(f"{self.where}: bad message {m!r}: role must be system/user/assistant and "
                                f"content a string")
        if self.choices is not None and (self.answer is None or not 0 <= self.answer < len(self.choices)):
            raise DataError(f"{self.where}: answer {self.answer!r} is not an index into the {len(self.choices)} "
                            f"choices")


def option_text(choices: Sequence[str]) -> str:
    return " ".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(choices))


def answer_text(index: int) -> str:
    return f"The answer is {LETTERS[index]}."


# ---------------------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------------------

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _resolve_image(value, root: Path, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise DataError(f"{where}: image must be a non-empty path string, got {value!r}")
    path = Path(value).expanduser()
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        raise DataError(f"{where}: image file not found: {path}")
    return path


def _answer_index(value, choices, where):
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and len(value) == 1 and value.upper() in LETTERS:
        return LETTERS.index(value.upper())
    raise DataError(f"{where}: answer must be an option index or letter, got {value!r}")


def _example_from_record(record: Any, root: Path, where: str) -> Example:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "conversations" in record:
        turns = record["conversations"]
        key_role, key_text = "from", "value"
    elif "messages" in record:
        turns = record["messages"]
        key_role, key_text = "role", "content"
    else:
        raise DataError(f"{where}: a record needs 'conversations' (LLaVA) or 'messages'")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: the conversation must be a non-empty list")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict) or turn.get(key_role) not in _ROLES or not isinstance(turn.get(key_text), str):
            raise DataError(f"{where}: bad turn {turn!r}: needs {key_role!r} in {sorted(_ROLES)} and a string "
                            f"{key_text!r}")
        messages.append({"role": _ROLES[turn[key_role]], "content": turn[key_text]})
    if "image" in record and "images" in record:
        raise DataError(f"{where}: give 'image' or 'images', not both")
    raw = record.get("images", [record["image"]] if record.get("image") is not None else [])
    if not isinstance(raw, list):
        raise DataError(f"{where}: 'images' must be a list of paths")
    images = [_resolve_image(v, root, where) for v in raw]
    choices = record.get("choices")
    answer = None
    if choices is not None:
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices) or not choices:
            raise DataError(f"{where}: 'choices' must be a non-empty list of strings")
        if "answer" not in record:
            raise DataError(f"{where}: 'choices' without 'answer'")
        answer = _answer_index(record["answer"], choices, where)
    category = record.get("category") or {}
    if isinstance(category, str):
        category = {"category": category}
    example = Example(messages, images, [], choices, answer, dict(category), where)
    example.check()
    return example


def load_conversations(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> list[Example]:
    """LLaVA-style conversations from a .jsonl file (one object per line) or a .json list."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    root = Path(image_root).expanduser() if image_root is not None else path.parent
    examples = []
    if path.suffix == ".json":
        try:
            records = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON: {e}") from None
        if not isinstance(records, list):
            raise DataError(f"{path}: a .json data file must hold a list of records")
        for i, record in enumerate(records):
            examples.append(_example_from_record(record, root, f"{path}: item {i}"))
    else:
        with open(path) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{number}: malformed JSON line: {e}") from None
                examples.append(_example_from_record(record, root, f"{path}:{number}"))
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def scienceqa_question(problem: dict, with_image: bool) -> str:
    parts = [IMAGE_MARKER] if with_image else []
    hint = (problem.get("hint") or "").strip()
    if hint:
        parts.append(f"Context: {hint}")
    parts.append(f"Question: {problem['question']}")
    parts.append(f"Options: {option_text(problem['choices'])}")
    return "\n".join(parts)


def load_scienceqa(root: str | os.PathLike, split: str, *, problems_file: str = "problems.json",
                   splits_file: str = "pid_splits.json", image_dir: str | None = None,
                   limit: int | None = None) -> list[Example]:
    """ScienceQA (`problems.json`, `pid_splits.json`; images at `<image_dir>/<split>/<pid>/<image>`, image_dir
    defaulting to `<root>/images`) as multiple-choice examples answered "The answer is X." Categories: subject
    (NAT/SOC/LAN), context (TXT/IMG/NO) and grade (G1-6/G7-12), as the paper's table."""
    root = Path(root).expanduser()
    problems_path, splits_path = root / problems_file, root / splits_file
    for p in (problems_path, splits_path):
        if not p.is_file():
            raise DataError(f"ScienceQA: {p} not found")
    try:
        problems = json.loads(problems_path.read_text())
        splits = json.loads(splits_path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"ScienceQA: invalid JSON: {e}") from None
    if split not in splits:
        raise DataError(f"ScienceQA: split {split!r} not in {splits_path} (has {sorted(splits)})")
    images_root = Path(image_dir).expanduser() if image_dir else root / "images"
    subjects = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}
    examples = []
    for pid in splits[split][:limit]:
        where = f"{problems_path}: problem {pid}"
        if pid not in problems:
            raise DataError(f"{where}: listed in {splits_path} but missing")
        p = problems[pid]
        for key in ("question", "choices", "answer"):
            if key not in p:
                raise DataError(f"{where}: missing {key!r}")
        images = [_resolve_image(str(Path(split) / pid / p["image"]), images_root, where)] if p.get("image") else []
        context = "IMG" if images else ("TXT" if (p.get("hint") or "").strip() else "NO")
        grade = p.get("grade", "")
        number = int(re.sub(r"\D", "", grade) or 0)
        category = {"subject": subjects.get(p.get("subject", ""), p.get("subject", "")), "context": context}
        if number:
            category["grade"] = "G1-6" if number <= 6 else "G7-12"
        messages = [{"role": "user", "content": scienceqa_question(p, bool(images))},
                    {"role": "assistant", "content": answer_text(int(p["answer"]))}]
        example = Example(messages, images, [], list(p["choices"]), int(p["answer"]), category, where)
        example.check()
        examples.append(example)
    if not examples:
        raise DataError(f"ScienceQA: split {split!r} is empty")
    return examples


# ---------------------------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------------------------

class PromptFormatter:
    """Conversation -> token ids and labels.

    prompt_format "chat" renders with the tokenizer's chat template; "plain" writes "User: ...\\nAssistant: ...".
    image_tokens: placeholder tokens per image (the vision encoder's token count), or 0 when the method takes
    images outside the text (LLaMA-Adapter V2). system: a system message put first when the data has none
    (None: the template's own default)."""

    def __init__(self, tokenizer, *, image_token_id: int | None, image_tokens: int, prompt_format: str = "chat",
                 system: str | None = None, max_length: int = 512):
        if prompt_format not in ("chat", "plain"):
            raise ValueError(f"prompt_format must be 'chat' or 'plain', got {prompt_format!r}")
        if prompt_format == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ValueError("prompt_format 'chat' needs a tokenizer with a chat template; this one has none "
                             "(use prompt_format: plain)")
        if image_tokens and image_token_id is None:
            raise ValueError("image placeholder tokens need an image_token_id")
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.image_tokens = image_tokens
        self.prompt_format = prompt_format
        self.system = system
        self.max_length = max_length
        self.eos_token = tokenizer.eos_token

    def _messages(self, messages: list[dict]) -> list[dict]:
        if self.system is not None and messages[0]["role"] != "system":
            return [{"role": "system", "content": self.system}] + messages
        return messages

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        if self.prompt_format == "chat":
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        text = ""
        for m in messages:
            if m["role"] == "system":
                text += m["content"] + "\n\n"
            elif m["role"] == "user":
                text += f"User: {m['content']}\n"
            else:
                text += f"Assistant: {m['content']}{self.eos_token}\n"
        return text + ("Assistant: " if generation_prompt else "")

    def segments(self, messages: list[dict], where: str = "") -> list[tuple[str, bool]]:
        """(text, supervised) pieces covering the conversation: each assistant turn (through its end token) is
        supervised, the rest is not."""
        messages = self._messages(messages)
        pieces: list[tuple[str, bool]] = []
        done = ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self._render(messages[:i], True)
            full = self._render(messages[:i + 1], False)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise DataError(f"{where}: the chat template does not render conversations incrementally; use "
                                f"prompt_format: plain")
            answer = full[len(prompt):]
            if self.eos_token and self.eos_token in answer:  # stop after the turn's end token
                answer = answer[:answer.index(self.eos_token) + len(self.eos_token)]
            pieces.append((prompt[len(done):], False))
            pieces.append((answer, True))
            done = prompt + answer
        return pieces

    def _tokenize(self, text: str, first: bool, where: str) -> list[int]:
        ids: list[int] = []
        parts = text.split(IMAGE_MARKER)
        for j, part in enumerate(parts):
            if part:
                add_special = first and not ids and self.prompt_format == "plain"
                ids += self.tokenizer(part, add_special_tokens=add_special)["input_ids"]
            if j < len(parts) - 1 and self.image_tokens:
                ids += [self.image_token_id] * self.image_tokens
        return ids

    def encode(self, example: Example) -> tuple[list[int], list[int]]:
        """Token ids and labels (IGNORE outside the assistant turns) of a training example."""
        ids: list[int] = []
        labels: list[int] = []
        for text, supervised in self.segments(example.messages, example.where):
            piece = self._tokenize(text, not ids, example.where)
            ids += piece
            labels += piece if supervised else [IGNORE] * len(piece)
        return self._truncate(ids, labels, example)

    def encode_prompt(self, example: Example) -> list[int]:
        """Token ids of the conversation up to the last assistant turn, with the generation prompt."""
        messages = self._messages(example.messages[:-1])
        ids = self._tokenize(self._render(messages, True), True, example.where)
        if len(ids) > self.max_length:
            raise DataError(f"{example.where}: the prompt has {len(ids)} tokens, more than max_length "
                            f"{self.max_length}")
        return ids

    def _truncate(self, ids, labels, example):
        if len(ids) > self.max_length:
            cut_placeholders = self.image_tokens and self.image_token_id in ids[self.max_length:]
            if cut_placeholders or all(label == IGNORE for label in labels[:self.max_length]):
                raise DataError(f"{example.where}: {len(ids)} tokens do not fit max_length {self.max_length} "
                                f"(truncation would cut an image or every answer token)")
            ids, labels = ids[:self.max_length], labels[:self.max_length]
        return ids, labels


# ---------------------------------------------------------------------------------------------------------------
# Collation
# ---------------------------------------------------------------------------------------------------------------

class Collator:
    """Left-padded batches: input_ids, attention_mask, labels, and the images' features.

    features: image identities -> their features stacked [N, tokens, C], None for a model without image input (the frozen encoder's cached output). per_sequence_images: one
    feature block per row ([B, tokens, C], zeros and sequence_modality 0 for text-only rows), as
    LLaMA-Adapter V2 takes them; otherwise [N_images, tokens, C] in placeholder order."""

    def __init__(self, pad_token_id: int, features: Callable[[list[str]], torch.Tensor] | None,
                 per_sequence_images: bool = False, feature_shape: tuple[int, int] | None = None,
                 feature_key: str = "image_features"):
        self.pad_token_id = pad_token_id
        self.features = features
        self.per_sequence_images = per_sequence_images
        self.feature_shape = feature_shape
        self.feature_key = feature_key  # "images" when the lookup gives preprocessed images for the model to encode

    def __call__(self, encoded: list[tuple[list[int], list[int]]], examples: list[Example]) -> dict:
        width = max(len(ids) for ids, _ in encoded)
        batch = len(encoded)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, width), IGNORE, dtype=torch.long)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for row, (ids, lab) in enumerate(encoded):
            n = len(ids)
            input_ids[row, width - n:] = torch.tensor(ids)
            labels[row, width - n:] = torch.tensor(lab)
            mask[row, width - n:] = 1
        out = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
        out.update(self.image_inputs(examples))
        return out

    def image_inputs(self, examples: list[Example]) -> dict:
        if self.features is None:  # a text-only model (the base LLM): its formatter dropped the image markers
            return {}
        if self.per_sequence_images:
            for ex in examples:
                if len(ex.image_ids) > 1:
                    raise DataError(f"{ex.where}: this method takes one image per sequence, got {len(ex.image_ids)}")
            present = [ex for ex in examples if ex.image_ids]
            if not present:
                return {}
            feats = self.features([ex.image_ids[0] for ex in present])
            full = feats.new_zeros((len(examples),) + tuple(feats.shape[1:]))
            rows = torch.tensor([i for i, ex in enumerate(examples) if ex.image_ids])
            full[rows] = feats
            modality = torch.zeros(len(examples), dtype=torch.long)
            modality[rows] = 1
            return {"image_features": full, "sequence_modality": modality}
        ids = [i for ex in examples for i in ex.image_ids]
        return {self.feature_key: self.features(ids)} if ids else {}
