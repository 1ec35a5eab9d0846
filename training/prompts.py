"""Prompts for every arm of a task, as chat messages, and their token ids.

- "userllm": the task's question alone; the user comes in through K user tokens.
- "text": the history rendered as text (title, genres, rating per event, or for reviews the
  product, rating and earlier summary) before the same question, cut to a token budget by
  dropping the oldest events first. The history comes first and the question last, so the
  three ML-1M questions about one user share their prompt prefix (the engine's prefix cache).
- "none": the question alone, no user at all.

One short system line per dataset replaces the chat template's default one (~20 tokens
saved on every prompt of every arm).
"""
from __future__ import annotations

from dataclasses import dataclass

from training.tasks import FUTURE_WINDOW, Example
from userenc.events import Event

ARMS = ("userllm", "text", "none")
SYSTEM = "You are a personal assistant for a movie and music service."
QUESTIONS = {
    "next_movie": "Which movie will I watch next? Answer with its title.",
    "genre_history": "What is my favourite movie genre? Answer with one genre.",
    "genre_future": f"Which genre will I watch most in my next {FUTURE_WINDOW} movies? "
                    "Answer with one genre.",
    "review": "Write the title of my review of product {item}, which I rated {rating}/5.",
}
HEADERS = {
    "review": "My earlier reviews (product | rating | review title):",
    "default": "Movies I watched, oldest first (title | genres | my rating):",
}


def _rating(e: Event) -> str:
    r = e.fields.get("rating")
    return f"{float(r):g}" if isinstance(r, (int, float)) else "?"


def event_line(e: Event, task: str) -> str:
    if task == "review":
        return f"{e.item_id} | {_rating(e)} | {str(e.fields.get('summary') or '').strip()}"
    genres = e.fields.get("genres") or []
    genres = ", ".join(genres) if isinstance(genres, (list, tuple)) else str(genres)
    title = e.fields.get("title") or f"item {e.item_id}"
    return f"{title} | {genres} | {_rating(e)}"


def question(ex: Example) -> str:
    q = QUESTIONS[ex.task]
    if ex.task == "review":
        assert ex.item is not None
        q = q.format(item=ex.item.item_id, rating=_rating(ex.item))
    return q


def messages(ex: Example, arm: str, lines: list[str] | None = None) -> list[dict]:
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r} (known: {', '.join(ARMS)})")
    content = question(ex)
    if arm == "text":
        header = HEADERS.get(ex.task, HEADERS["default"])
        shown = lines if lines is not None else [event_line(e, ex.task) for e in ex.history]
        content = "\n".join([header, *shown, "", content])
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}]


def chat_ids(tokenizer, msgs: list[dict]) -> list[int]:
    ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if not isinstance(ids, list) else ids)


@dataclass(slots=True)
class Prompt:
    ids: list[int]
    events_shown: int  # history events in the prompt (text arm; the others: 0)


def prompt_ids(tokenizer, ex: Example, arm: str, budget: int) -> Prompt:
    """Token ids of the arm's prompt. The text arm keeps the most recent events that fit in
    `budget` tokens (found by bisection on the real tokenization)."""
    if arm != "text":
        return Prompt(chat_ids(tokenizer, messages(ex, arm)), 0)
    lines = [event_line(e, ex.task) for e in ex.history]
    full = chat_ids(tokenizer, messages(ex, arm, lines))
    if len(full) <= budget:
        return Prompt(full, len(lines))
    lo, hi = 0, len(lines)  # keep the last `lo` lines: fits; the last `hi`: does not
    best = chat_ids(tokenizer, messages(ex, arm, []))
    if len(best) > budget:
        raise ValueError(f"the text prompt does not fit in {budget} tokens even without history")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ids = chat_ids(tokenizer, messages(ex, arm, lines[-mid:]))
        if len(ids) <= budget:
            lo, best = mid, ids
        else:
            hi = mid
    return Prompt(best, lo)


def answer_ids(tokenizer, text: str, end_token: int) -> list[int]:
    """An answer's token ids as the model writes them after the prompt, with the end token."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [int(t) for t in ids] + [end_token]
