"""A tiny chat LLM for adapter tests: a random 2-layer Llama saved as a Hugging Face folder with
a byte-level BPE tokenizer that knows the sample data's genre words and a ChatML-like template
whose turns end with an end token, like SmolLM2's."""
from __future__ import annotations

from pathlib import Path

import torch

from userenc.events import Event

GENRES = ["action", "comedy", "drama", "horror", "romance", "scifi", "docs", "kids"]
CORPUS = ([" ".join(GENRES)] * 20
          + ["system user assistant What is my favourite movie genre? Answer with one genre.",
             "Which movie will I watch next? Answer with its title. item i1 i2 i3 | 5 4 3 2 1",
             "You are a personal assistant for a movie and music service."] * 5)
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}<end>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def make_tiny_chat_llm(folder: Path, seed: int = 0, layers: int = 4, hidden: int = 64) -> Path:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=400, min_frequency=1,
                            special_tokens=["<s>", "</s>", "<pad>", "<end>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>",
                                  eos_token="<end>", pad_token="<pad>")
    tok.chat_template = CHAT_TEMPLATE
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, bos_token_id=0, eos_token_id=3,
                      pad_token_id=2, tie_word_embeddings=True,
                      # With GPT's 0.02 the tied embeddings cap every logit margin near 1.3:
                      # a frozen random model could never say one word with confidence.
                      initializer_range=0.2)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def titled(histories: dict[str, list[Event]]) -> dict[str, list[Event]]:
    """The sample events with a title per item (its genre and id), as ML-1M's carry."""
    return {u: [Event(e.event_id, e.user_id, e.item_id, e.timestamp,
                      e.fields | {"title": f"{e.fields['genres'][0]} {e.item_id} (2001)"})
                for e in h] for u, h in histories.items()}
