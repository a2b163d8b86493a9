"""Masking personal data before anything is trained on: e-mail, phone and card numbers.

Extra patterns come from ``[training] redact_patterns``. Card numbers are checked with
the Luhn sum, so an order number or a long count is not mistaken for one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
PHONE = re.compile(r"(?<![\w+(])(?:\+|00|\()?\d[\d ().-]{6,}\d(?!\w)")


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(match: re.Match[str]) -> str:
    digits = re.sub(r"\D", "", match.group())
    return "[card]" if _luhn(digits) else match.group()


DATE = re.compile(r"\d{4}-\d{1,2}-\d{1,2}|\d{1,2}[./-]\d{1,2}[./-]\d{2,4}")


def _phone(match: re.Match[str]) -> str:
    if DATE.fullmatch(match.group()):
        return match.group()
    digits = re.sub(r"\D", "", match.group())
    return "[phone]" if 7 <= len(digits) <= 15 else match.group()


class Redactor:
    def __init__(self, extra_patterns: Iterable[str] = ()) -> None:
        self.extra = [re.compile(p) for p in extra_patterns]

    def __call__(self, text: str) -> str:
        text = EMAIL.sub("[email]", text)
        text = CARD.sub(_card, text)
        text = PHONE.sub(_phone, text)
        for pattern in self.extra:
            text = pattern.sub("[redacted]", text)
        return text
