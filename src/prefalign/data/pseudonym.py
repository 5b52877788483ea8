"""Pseudonymous annotator ids: a keyed hash, so a deletion request can find every row of one person
without the data holding who they are. The key comes from the environment and is never logged."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os

log = logging.getLogger(__name__)

KEY_ENV = "PREFALIGN_ANNOTATOR_KEY"
# Used only when the environment has no key, so the demo runs out of the box. It is public, so ids
# hashed with it are NOT pseudonymous: production sets PREFALIGN_ANNOTATOR_KEY.
DEMO_KEY = "prefalign-demo-annotator-key"
_warned_demo_key = False


def _annotator_key() -> str:
    global _warned_demo_key
    key = os.environ.get(KEY_ENV)
    if key:
        return key
    if not _warned_demo_key:
        log.warning("%s is not set: annotator ids are hashed with the public demo key (not pseudonymous)", KEY_ENV)
        _warned_demo_key = True
    return DEMO_KEY


def pseudonymise(annotator_id: str, key: str | None = None) -> str:
    """A keyed hash of an annotator id: stable for one key, not reversible without it.

    Args:
        annotator_id: The raw id (e.g. a user name).
        key: HMAC key; None reads ``PREFALIGN_ANNOTATOR_KEY`` (falling back to ``DEMO_KEY`` with a
            warning logged once).

    Returns:
        The first 16 hex characters of HMAC-SHA256(key, annotator_id).
    """
    secret = _annotator_key() if key is None else key
    return hmac.new(secret.encode(), str(annotator_id).encode(), hashlib.sha256).hexdigest()[:16]
