"""The operator's errors, mapped onto kopf's vocabulary (permanent vs. temporary)."""

from __future__ import annotations

import kopf


class SpecError(kopf.PermanentError):
    """The spec cannot be rendered; retrying will not help until the user edits it."""


class NotReady(kopf.TemporaryError):
    """Something the reconcile depends on is not there yet; kopf retries after `delay` seconds."""
