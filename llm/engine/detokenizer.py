"""Output text for streaming, and stop strings checked on that text.

The whole output is re-decoded each step (a Rust tokenizer call over at most a few hundred ids):
incremental decoding by token is wrong for byte-fallback pieces and leading-space rules, while
the full decode is always right. What is streamed is held back while it could still change: a
trailing U+FFFD (an incomplete UTF-8 sequence) or a tail that may be the start of a stop string.
"""
from __future__ import annotations

from llm.engine.sequence import Sequence


def _held_back_tail(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of `text` might still change or turn into a stop string."""
    hold = 0
    stripped = text.rstrip("\ufffd")
    hold = len(text) - len(stripped)
    for stop in stops:
        for n in range(min(len(stop) - 1, len(stripped)), 0, -1):
            if stripped.endswith(stop[:n]):
                hold = max(hold, len(text) - len(stripped) + n)
                break
    return hold


class Detokenizer:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def update(self, seq: Sequence, finishing: bool) -> tuple[str, bool]:
        """Refresh seq.text after new tokens. Returns (text to emit now, hit a stop string).
        With `finishing` (the request ends this step for another reason) nothing is held."""
        params = seq.sampling
        text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=params.skip_special_tokens)
        stopped = False
        if params.stop:
            # Only the part that could contain a new occurrence is searched.
            start = max(0, seq.num_emitted_chars - max(len(s) for s in params.stop))
            found = [i for i in (text.find(s, start) for s in params.stop) if i >= 0]
            if found:
                text = text[:min(found)]
                stopped = True
        seq.text = text
        end = len(text) if (stopped or finishing) else len(text) - _held_back_tail(text, params.stop)
        end = max(end, seq.num_emitted_chars)
        new_text = text[seq.num_emitted_chars:end]
        seq.num_emitted_chars = end
        return new_text, stopped
