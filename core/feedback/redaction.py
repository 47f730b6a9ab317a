"""Redaction before storage: e-mail addresses, card-like numbers and the config's own patterns never reach the log.

Applied by core/feedback/requestlog.py to every message and the answer of a completion before it is written. The
same detectors (pii_kinds) let validation (core/data/validation.py) find what is still there in training rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from core.feedback.config import RequestLogConfig

EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# 13-19 digits, single spaces or dashes between them; not inside a longer run of digits
CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d])")


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        n = int(ch)
        if i % 2:
            n = n * 2 - 9 if n > 4 else n * 2
        total += n
    return total % 10 == 0


def _is_card(match: re.Match) -> bool:
    return luhn_valid(re.sub(r"\D", "", match.group()))  # order numbers and phone numbers are not


def _card(match: re.Match) -> str:
    return "[card]" if _is_card(match) else match.group()


def pii_kinds(text: str) -> list[str]:
    """What the built-in redaction would replace in `text`: "email" and/or "card" (a Luhn-valid card-like number),
    never the matched text itself, so that a caller can report it without logging it."""
    kinds = ["email"] if EMAIL.search(text) else []
    if any(_is_card(m) for m in CARD.finditer(text)):
        kinds.append("card")
    return kinds


@dataclass(frozen=True)
class Redactor:
    """redact(text) as the config asks: emails -> [email], Luhn-valid card numbers -> [card], patterns -> [redacted]."""

    emails: bool = True
    cards: bool = True
    patterns: tuple[re.Pattern, ...] = ()

    @classmethod
    def from_config(cls, cfg: RequestLogConfig) -> Redactor:
        return cls(cfg.redact_emails, cfg.redact_card_numbers, tuple(re.compile(p) for p in cfg.redact_patterns))

    def __call__(self, text: str) -> str:
        # user patterns first: they may be more specific than the built-in ones (an id that contains digits)
        for pattern in self.patterns:
            text = pattern.sub("[redacted]", text)
        if self.emails:
            text = EMAIL.sub("[email]", text)
        if self.cards:
            text = CARD.sub(_card, text)
        return text

    def messages(self, messages: list[dict]) -> list[dict]:
        return [{**m, "content": self(m["content"])} for m in messages]


def redact(text: str, cfg: RequestLogConfig | None = None) -> str:
    """`text` with what `cfg` (defaults: emails and cards) says may not be stored replaced."""
    return Redactor.from_config(cfg or RequestLogConfig())(text)
