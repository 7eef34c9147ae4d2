"""A light PII scan: email addresses, phone numbers and card-like numbers (Luhn-valid, 13-19 digits).

It flags; it does not remove. Matches are shown masked in the audit. Regexes miss things and find some
false positives (a long order number that happens to pass Luhn); treat the result as a prompt to look.
"""

from __future__ import annotations

import re

EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w-])")
# digit runs with optional separators; classified by digit count and the Luhn check below
NUMBERISH = re.compile(r"(?<![\w+])\+?\(?\d[\d \t().-]{7,}\d(?![\w])")
KINDS = ("email", "phone", "card")


def luhn_ok(digits: str) -> bool:
    total, parity = 0, len(digits) % 2
    for i, ch in enumerate(digits):
        d = ord(ch) - 48
        if i % 2 == parity:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def mask(s: str) -> str:
    keep = 2 if len(s) > 6 else 1
    return s[:keep] + "*" * (len(s) - 2 * keep) + s[-keep:]


def scan(text: str) -> list[tuple[str, str]]:
    """(kind, matched text) for each email, phone or card-like number in `text`."""
    found = [("email", m.group()) for m in EMAIL.finditer(text)]
    if any(ch.isdigit() for ch in text):
        for m in NUMBERISH.finditer(text):
            raw = m.group().strip()
            digits = "".join(ch for ch in raw if ch.isdigit())
            if 13 <= len(digits) <= 19 and luhn_ok(digits) and re.fullmatch(r"[\d -]+", raw):
                found.append(("card", raw))
            elif 9 <= len(digits) <= 15 and not re.fullmatch(r"\d{4}-\d{2}-\d{2}.*", raw):
                found.append(("phone", raw))
    return found
