"""Output text for streaming, and stop strings checked on that text.

Incremental, for the requests that asked for text (SamplingParams.detokenize): each step
decodes two short windows per stream, token_ids[prefix_offset:read_offset] (text already
produced) and token_ids[prefix_offset:] (the same plus the new tokens); the new text is what the
second adds to the first. Decoding from a few tokens back, not from the new token alone, keeps
leading-space rules and byte-fallback pieces right (vLLM's scheme). A window ending in U+FFFD
(an incomplete UTF-8 sequence) waits for more tokens. All streams of a step go to the Rust
tokenizer in one decode_batch call when the tokenizer has one and cleans up no spaces.
What is streamed is also held back while its tail may be the start of a stop string.
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
        backend = getattr(tokenizer, "backend_tokenizer", None)
        cleans = getattr(tokenizer, "clean_up_tokenization_spaces", False)
        self._decode_batch = (backend.decode_batch
                              if backend is not None and hasattr(backend, "decode_batch")
                              and not cleans else None)

    def _decode(self, windows: list[list[int]], skip: bool) -> list[str]:
        if self._decode_batch is not None:
            return self._decode_batch(windows, skip_special_tokens=skip)
        return [self.tokenizer.decode(w, skip_special_tokens=skip) for w in windows]

    def update(self, seqs: list[Sequence], finishing: list[bool]) -> list[tuple[str, bool]]:
        """Refresh each seq.text after its new tokens. Per sequence: (text to emit now, hit a
        stop string). A finishing sequence (it ends this step for another reason) holds
        nothing back."""
        out: list[tuple[str, bool]] = [("", False)] * len(seqs)
        for skip in (True, False):
            idx = [i for i, s in enumerate(seqs) if s.sampling.skip_special_tokens is skip]
            if not idx:
                continue
            windows = []
            for i in idx:
                ids, s = seqs[i].token_ids, seqs[i]
                windows.append(ids[s.prefix_offset:s.read_offset])
                windows.append(ids[s.prefix_offset:])
            texts = self._decode(windows, skip)
            for j, i in enumerate(idx):
                out[i] = self._advance(seqs[i], texts[2 * j], texts[2 * j + 1], finishing[i])
        return out

    @staticmethod
    def _advance(seq: Sequence, before: str, after: str, finishing: bool) -> tuple[str, bool]:
        delta = ""
        if len(after) > len(before) and (finishing or not after.endswith("\ufffd")):
            delta = after[len(before):]
            seq.prefix_offset, seq.read_offset = seq.read_offset, len(seq.token_ids)
        params = seq.sampling
        text = seq.text + delta if delta else seq.text
        stopped = False
        if params.stop:
            # Only the part that could contain a new occurrence is searched.
            start = max(0, seq.num_emitted_chars - max(len(s) for s in params.stop))
            found = [i for i in (text.find(s, start) for s in params.stop) if i >= 0]
            if found:
                text = text[:min(found)]
                stopped = True
        seq.text = text
        if stopped or finishing or not (params.stop or text.endswith("\ufffd")):
            end = len(text)
        else:
            end = len(text) - _held_back_tail(text, params.stop)
        end = max(end, seq.num_emitted_chars)
        new_text = text[seq.num_emitted_chars:end]
        seq.num_emitted_chars = end
        return new_text, stopped
