"""A character-level HF tokenizer for the demo, built with the tokenizers library.

One token per character keeps digits separate (BPE merges like "37" would make carries
harder to learn for a tiny model). Special tokens and the chat template follow Qwen's
ChatML layout so the demo goes through the same apply_chat_template path as Qwen2.5.
"""
from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, EOS, BOS_MSG, UNK = "<|endoftext|>", "<|im_end|>", "<|im_start|>", "<unk>"
SPECIALS = [PAD, BOS_MSG, EOS, UNK]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    chars = sorted(set(string.printable) - set("\r\x0b\x0c\t"))  # "\n" and " " stay
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Every character is its own pre-token; Oniguruma's (?m) makes "." match the newline too.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"(?m)."), behavior="isolated")
    tok.decoder = decoders.Fuse()  # WordLevel would otherwise join tokens with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=UNK, pad_token=PAD, eos_token=EOS,
        additional_special_tokens=[BOS_MSG],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "right"  # megatron's RoPE ignores position_ids (DESIGN.md section 3)
    return fast
