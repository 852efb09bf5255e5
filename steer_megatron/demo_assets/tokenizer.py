"""A character-level HF tokenizer for the demo, built with the tokenizers library.

One token per character keeps digits separate (BPE merges like "37" would make carries
harder to learn for a tiny model). It is a byte-level BPE with no merges, the same pipeline as
Qwen2's tokenizer: transformers loads any `model_type: qwen2` directory through its Qwen2
tokenizer class, which rebuilds the byte-level pipeline from tokenizer.json, so a tokenizer of
another kind (e.g. WordLevel) would silently lose spaces and newlines on reload. Special tokens
and the chat template follow Qwen's ChatML layout.
"""
from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, EOS, BOS_MSG = "<|endoftext|>", "<|im_end|>", "<|im_start|>"
SPECIALS = [PAD, BOS_MSG, EOS]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_symbol(b: int) -> str:
    """The printable stand-in byte-level BPE uses for byte b (GPT-2's table: bytes that are
    printable Latin-1 stand for themselves, the others map to 256 + their rank among them)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    if b in printable:
        return chr(b)
    return chr(256 + sum(1 for x in range(b) if x not in printable))


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    chars = sorted(set(string.printable) - set("\r\x0b\x0c\t"))  # "\n" and " " stay
    vocab = {tok: i for i, tok in enumerate(SPECIALS + [_byte_symbol(ord(c)) for c in chars])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, additional_special_tokens=[BOS_MSG])
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "right"  # megatron's RoPE ignores position_ids (DESIGN.md section 3)
    return fast
