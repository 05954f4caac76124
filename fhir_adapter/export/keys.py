"""Keyed pseudonyms and per-subject date offsets (HMAC-SHA256 of ``FHIR_ADAPTER_DEID_KEY``).

A pseudonym is a function of the key and the business value alone (``S001`` -> the same
pseudonym wherever it appears: Patient id, identifier value, meta.tag code, references), so the
export keeps the source's structure without its values. Pseudonyms and date offsets use separate
HMAC domains: knowing one reveals nothing about the other.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re

from pydantic import SecretStr

from fhir_adapter.errors import ConfigurationError

MIN_KEY_CHARS = 32
_PSEUDONYM = b"fhir-adapter/deid/v1/pseudonym\x00"
_DATE_SHIFT = b"fhir-adapter/deid/v1/date-shift\x00"

# FHIR date, dateTime and instant: YYYY, YYYY-MM, YYYY-MM-DD, then an optional time and zone
_DATE = re.compile(
    r"^(\d{4})(?:-(\d{2})(?:-(\d{2})(T\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:\d{2})?)?)?)?$"
)
# what a kept string must not look like in a subject's resource (at least year and month)
DATE_LIKE = re.compile(r"\d{4}-\d{2}(?:-\d{2})?")


class MissingKey(ConfigurationError):
    """No usable FHIR_ADAPTER_DEID_KEY (exit 66): the export refuses to run."""


def key_bytes(secret: SecretStr | None) -> bytes:
    if secret is None or not secret.get_secret_value():
        raise MissingKey(
            "FHIR_ADAPTER_DEID_KEY is not set: the de-identified export needs its secret HMAC "
            f"key (at least {MIN_KEY_CHARS} characters, e.g. from "
            "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
        )
    value = secret.get_secret_value()
    if len(value) < MIN_KEY_CHARS:
        raise MissingKey(
            f"FHIR_ADAPTER_DEID_KEY is too short: use at least {MIN_KEY_CHARS} random characters "
            "(a short key lets anyone who guesses it re-identify the export)"
        )
    return value.encode()


class Keys:
    """Pseudonyms and date offsets of one key."""

    def __init__(self, key: bytes, *, hex_length: int, max_shift_days: int) -> None:
        self._key = key
        self.hex_length = hex_length
        self.max_shift_days = max_shift_days

    def _digest(self, domain: bytes, value: str) -> bytes:
        return hmac.new(self._key, domain + value.encode(), hashlib.sha256).digest()

    def pseudonym(self, value: str) -> str:
        return self._digest(_PSEUDONYM, value).hex()[: self.hex_length]

    def shift_days(self, subject: str) -> int:
        """Days every date of ``subject`` moves back: 1 .. max_shift_days (never 0)."""
        number = int.from_bytes(self._digest(_DATE_SHIFT, subject)[:8], "big")
        return 1 + number % self.max_shift_days


def parse_date(value: str) -> tuple[dt.date, str, int] | None:
    """(first day, time part, precision 1-3) of a FHIR date/dateTime/instant, or None."""
    match = _DATE.match(value)
    if not match:
        return None
    year, month, day, time = match.groups()
    try:
        first = dt.date(int(year), int(month or 1), int(day or 1))
    except ValueError:
        return None
    precision = 3 if day else 2 if month else 1
    return first, time or "", precision


def shift_date(value: str, days: int) -> str | None:
    """``value`` moved back by ``days`` at its own precision; None if it is not a FHIR date.

    Time of day and zone are kept, so intervals between full dates and times stay exact; a
    year or year-month value is shifted as its first day and cut back to its precision.
    """
    parsed = parse_date(value)
    if parsed is None:
        return None
    first, time, precision = parsed
    try:
        moved = first - dt.timedelta(days=days)
    except OverflowError:
        return None
    if precision == 1:
        return f"{moved.year:04d}"
    if precision == 2:
        return f"{moved.year:04d}-{moved.month:02d}"
    return moved.isoformat() + time


def as_instant(value: str, tz: dt.tzinfo) -> dt.datetime | None:
    """A FHIR date/dateTime as an aware datetime (a date: its midnight in ``tz``)."""
    parsed = parse_date(value)
    if parsed is None:
        return None
    first, time, _ = parsed
    if not time:
        return dt.datetime(first.year, first.month, first.day, tzinfo=tz)
    try:
        moment = dt.datetime.fromisoformat(first.isoformat() + time)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=tz)


__all__ = [
    "DATE_LIKE",
    "MIN_KEY_CHARS",
    "Keys",
    "MissingKey",
    "as_instant",
    "key_bytes",
    "parse_date",
    "shift_date",
]
