"""API keys: ``orca_`` + 32 random bytes (urlsafe base64), stored only as their sha256.

The plaintext is returned once by :func:`create_key` and never kept; requests are matched by the
hash of the presented key. A short prefix is stored so operators can tell keys apart.
"""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from api.models import ApiKey, Tenant, utcnow

KEY_PREFIX = "orca_"
KEY_RANDOM_BYTES = 32
# How much of a key is stored in clear to identify it ("orca_" + 7 characters).
KEY_DISPLAY_CHARS = 12


def generate_key() -> str:
    """A fresh random API key (plaintext)."""
    return KEY_PREFIX + secrets.token_urlsafe(KEY_RANDOM_BYTES)


def hash_key(key: str) -> str:
    """The stored form of a key."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def get_or_create_tenant(session: Session, tenant_name: str) -> Tenant:
    """The tenant called ``tenant_name``, created if it does not exist yet (flushed, not committed)."""
    tenant = session.scalar(select(Tenant).where(Tenant.name == tenant_name))
    if tenant is None:
        tenant = Tenant(name=tenant_name)
        session.add(tenant)
        session.flush()
    return tenant


def create_key(session: Session, tenant_name: str) -> str:
    """Create an API key for ``tenant_name`` (creating the tenant if needed); returns the
    plaintext, which is not stored anywhere. The caller commits (``session_scope`` does)."""
    tenant = get_or_create_tenant(session, tenant_name)
    key = generate_key()
    session.add(ApiKey(tenant_id=tenant.id, key_hash=hash_key(key), prefix=key[:KEY_DISPLAY_CHARS]))
    session.flush()
    return key


def revoke_key(session: Session, prefix_or_id: str) -> list[ApiKey]:
    """Revoke the keys whose id equals, or whose stored prefix starts with, ``prefix_or_id``.

    Raises ``LookupError`` when nothing matches and ``ValueError`` when a prefix is ambiguous
    (revoke by id then). Already revoked keys are left as they are.
    """
    if not prefix_or_id:
        raise ValueError("give a key id or prefix")
    # A full key pasted by mistake is matched by its own prefix.
    needle = (
        prefix_or_id[:KEY_DISPLAY_CHARS] if prefix_or_id.startswith(KEY_PREFIX) else prefix_or_id
    )
    keys = list(
        session.scalars(
            select(ApiKey).where(
                or_(ApiKey.id == prefix_or_id, ApiKey.prefix.startswith(needle, autoescape=True))
            )
        )
    )
    if not keys:
        raise LookupError(f"no API key matches {prefix_or_id!r}")
    if len(keys) > 1 and not any(key.id == prefix_or_id for key in keys):
        raise ValueError(f"{prefix_or_id!r} matches {len(keys)} keys; revoke by id")
    if len(keys) > 1:
        keys = [key for key in keys if key.id == prefix_or_id]
    now = utcnow()
    for key in keys:
        if key.revoked_at is None:
            key.revoked_at = now
    session.flush()
    return keys


def list_keys(session: Session, tenant_name: str | None = None) -> list[tuple[ApiKey, Tenant]]:
    """Keys (never their plaintext) with their tenants, optionally for one tenant."""
    query = select(ApiKey, Tenant).join(Tenant, Tenant.id == ApiKey.tenant_id)
    if tenant_name is not None:
        query = query.where(Tenant.name == tenant_name)
    return [(key, tenant) for key, tenant in session.execute(query.order_by(ApiKey.id)).tuples()]


def tenant_for_key(session: Session, key: str) -> Tenant | None:
    """The tenant owning an unrevoked key, or None."""
    if not key.startswith(KEY_PREFIX):
        return None
    return session.scalar(
        select(Tenant)
        .join(ApiKey, ApiKey.tenant_id == Tenant.id)
        .where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None))
    )


# -- browser-facing headers -----------------------------------------------------------------------

# The dashboard is same-origin scripts and styles only: no inline script or style, no third-party
# origin, plots shown from blob: URLs made of bytes fetched with the key, nothing may frame it.
DASHBOARD_CSP = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' blob:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)


def browser_security_headers() -> dict[str, str]:
    """Headers for responses a browser renders (the dashboard page and its assets)."""
    return {
        "Content-Security-Policy": DASHBOARD_CSP,
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        # The key lives in sessionStorage, never in a URL, but keep other pages' URLs private too.
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",
    }
