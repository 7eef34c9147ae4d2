"""Held-out probe conversations for checking a converted model against its source.

They are fixed (not drawn from the training data) and rendered with the model's own chat template, assistant
turns included, so the comparison covers both the template tokens and free text. The demo task (job posting
to JSON) is one of them, so a tuned extraction model is probed where it was changed most.
"""

from __future__ import annotations

PROBES: list[list[dict]] = [
    [
        {
            "role": "user",
            "content": "Senior Data Engineer at Northwind Labs, Berlin. Hybrid, two days a week in the office.",
        },
        {
            "role": "assistant",
            "content": '{"title": "Senior Data Engineer", "company": "Northwind Labs", "location": "Berlin", "remote": false}',
        },
    ],
    [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
    ],
    [
        {"role": "user", "content": "Write a Python function that returns the square of a number."},
        {"role": "assistant", "content": "def square(x):\n    return x * x"},
        {"role": "user", "content": "Now make it work on a list."},
        {"role": "assistant", "content": "def squares(xs):\n    return [x * x for x in xs]"},
    ],
    [
        {"role": "user", "content": "Give me three tips for sleeping better, briefly."},
        {
            "role": "assistant",
            "content": "1. Keep a regular schedule.\n2. Avoid screens an hour before bed.\n3. Keep the room cool and dark.",
        },
    ],
    [
        {
            "role": "user",
            "content": "We're hiring! Remote-first startup Kelpie AI seeks a Frontend Developer (React).",
        },
        {
            "role": "assistant",
            "content": '{"title": "Frontend Developer", "company": "Kelpie AI", "location": null, "remote": true}',
        },
    ],
    [
        {"role": "user", "content": "Translate 'good morning' into Spanish and German."},
        {"role": "assistant", "content": "Spanish: buenos días. German: guten Morgen."},
    ],
]


def probe_token_ids(tokenizer, system_prompt: str | None = None, limit: int | None = None) -> list[list[int]]:
    """Token ids of each probe conversation, rendered with the tokenizer's chat template (or plain text)."""
    out = []
    for conv in PROBES[:limit]:
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + conv
        if tokenizer.chat_template:
            text = tokenizer.apply_chat_template(messages, tokenize=False)
        else:
            text = "\n".join(m["content"] for m in messages)
        out.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return out
