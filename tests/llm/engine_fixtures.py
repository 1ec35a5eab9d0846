"""Shared helpers for the engine tests: a tiny random Llama saved as a Hugging Face folder
(byte-level BPE tokenizer trained on a few sentences, a simple chat template)."""
from __future__ import annotations

from pathlib import Path

import torch

CORPUS = ["The quick brown fox jumps over the lazy dog. " * 3, "Hello world, how are you today?",
          "user assistant system", "Paged attention with block tables and prefix caching."] * 5
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")


def make_tiny_llama(folder: Path, seed: int = 0, layers: int = 2) -> Path:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=320, min_frequency=1,
                            special_tokens=["<s>", "</s>", "<pad>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>",
                                  eos_token="</s>", pad_token="<pad>")
    tok.chat_template = CHAT_TEMPLATE
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, bos_token_id=0, eos_token_id=1,
                      pad_token_id=2, tie_word_embeddings=False,
                      # Peaky logits: greedy choices far from ties, so equality tests test the
                      # engine, not rounding.
                      initializer_range=0.3)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def random_prompts(n: int, lengths, vocab: int = 300, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    # ids >= 3 (no special tokens inside prompts)
    return [torch.randint(3, vocab, (lengths[i % len(lengths)],), generator=g).tolist()
            for i in range(n)]
