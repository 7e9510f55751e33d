"""Shared pieces of the trainer / CLI tests: a character-level tokenizer with a chat template, a tiny LLaMA
saved as a local checkpoint directory, and multiple-choice examples with random image features."""
import random

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from pill.data import Example, answer_text, option_text

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
VOCAB = 112
WORDS = ["zero", "one", "two", "three", "four", "five"]


def char_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + chars)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>",
                                        bos_token="<|im_start|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llm(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="sdpa",
                         initializer_range=0.3)  # logits wide enough for the adapters to move the loss
    return LlamaForCausalLM(config).to(dtype)


def save_tiny_llm(directory, seed=0):
    model = tiny_llm(seed)
    model.save_pretrained(directory, safe_serialization=True)
    char_tokenizer().save_pretrained(directory)
    return directory


def mc_examples(n, seed=0, tokens=2, dim=8, with_images=True):
    """Multiple-choice items over random 'images' (feature tensors in a dict) and the lookup for them."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    store = {}
    examples = []
    for i in range(n):
        label = rng.randrange(len(WORDS))
        options = rng.sample([w for w in range(len(WORDS)) if w != label], 2) + [label]
        rng.shuffle(options)
        choices = [WORDS[o] for o in options]
        answer = options.index(label)
        marker = "<image>\n" if with_images else ""
        messages = [{"role": "user", "content": f"{marker}Which? Options: {option_text(choices)}"},
                    {"role": "assistant", "content": answer_text(answer)}]
        ids = []
        if with_images:
            key = f"img{seed}-{i}"
            store[key] = torch.randn(tokens, dim, generator=gen)
            ids = [key]
        examples.append(Example(messages, [object()] * len(ids), ids, choices, answer,
                                {"parity": "even" if label % 2 == 0 else "odd"}, f"item {i}"))
    return examples, (lambda keys: torch.stack([store[k] for k in keys]))
