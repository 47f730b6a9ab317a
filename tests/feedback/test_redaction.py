"""Redaction before storage: e-mails, Luhn-valid card numbers, user patterns; a bad pattern fails the config."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from core.feedback.config import RequestLogConfig
from core.feedback.redaction import Redactor, luhn_valid, redact


def test_emails_and_card_numbers_are_replaced():
    text = "Mail jane.doe+acme@example.co.uk, card 4111 1111 1111 1111 or 5500-0000-0000-0004 or 4012888888881881."
    assert redact(text) == "Mail [email], card [card] or [card] or [card]."


def test_numbers_that_are_not_cards_stay():
    assert not luhn_valid("4111111111111112")
    kept = "Order 4111111111111112, phone +1 555 010 9999, twelve 123456789012, twenty 12345678901234567890."
    assert redact(kept) == kept


def test_user_patterns_and_switches():
    cfg = RequestLogConfig(redact_patterns=[r"ACME-\d{6}"], redact_emails=False, redact_card_numbers=False)
    assert redact("ticket ACME-123456 from a@b.io, 4111111111111111", cfg) == (
        "ticket [redacted] from a@b.io, 4111111111111111"
    )
    messages = [{"role": "user", "content": "I am a@b.io"}]
    assert Redactor.from_config(RequestLogConfig()).messages(messages) == [{"role": "user", "content": "I am [email]"}]


def test_a_bad_pattern_is_a_config_error():
    with pytest.raises(ValidationError, match=r"redact_patterns\[1\] '\(unclosed' is not a valid regular expression"):
        RequestLogConfig(redact_patterns=["ok", "(unclosed"])


def test_pii_kinds_finds_what_redaction_removes_and_never_returns_it():
    from core.feedback.redaction import pii_kinds

    assert pii_kinds("Mail jane.doe+acme@example.co.uk") == ["email"]
    assert pii_kinds("card 5500-0000-0000-0004, from a@b.io") == ["email", "card"]
    assert pii_kinds("Order 4111111111111112, phone +1 555 010 9999") == []  # fails the Luhn check
    assert pii_kinds(redact("a@b.io paid with 4111 1111 1111 1111")) == []  # nothing left once redacted
