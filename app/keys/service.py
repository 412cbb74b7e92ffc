"""API keys: one project per key; only a hash of the key is stored."""

import hashlib
import secrets

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from app.db.tables import ApiKey, utcnow

KEY_PREFIX = "tf-"


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_key(session: Session, *, project: str) -> tuple[ApiKey, str]:
    """Create a key for `project`; returns the row and the plaintext key, shown once."""
    token = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(id="key-" + secrets.token_hex(12), project=project, key_hash=_hash(token), prefix=token[:10])
    session.add(key)
    session.flush()
    return key, token


# Every authenticated request runs this, so it is built once (SQLAlchemy caches its SQL and cache key
# then) and runs as a plain statement on the session's connection: it reads one column, and needs none of
# the ORM's object loading. Read at every request, so a revoked key stops working at once.
_LIVE_KEY_PROJECT = select(ApiKey.project).where(
    ApiKey.key_hash == bindparam("key_hash"), ApiKey.revoked_at.is_(None)
)


def project_for_token(session: Session, *, token: str) -> str | None:
    """The project a live key belongs to, or None for an unknown or revoked key."""
    return session.connection().execute(_LIVE_KEY_PROJECT, {"key_hash": _hash(token)}).scalar_one_or_none()


def revoke_key(session: Session, *, key_id: str) -> bool:
    """Revoke a key by id; False if there is no such live key."""
    key = session.get(ApiKey, key_id)
    if key is None or key.revoked_at is not None:
        return False
    key.revoked_at = utcnow()
    session.flush()
    return True


def list_keys(session: Session, *, project: str | None = None) -> list[ApiKey]:
    """Keys, newest first, optionally of one project."""
    query = select(ApiKey).order_by(ApiKey.created_at.desc())
    if project:
        query = query.where(ApiKey.project == project)
    return list(session.scalars(query))
