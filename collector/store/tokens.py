"""API tokens: ``mox_`` + 256 random bits; the store keeps the SHA-256 of the secret, never the secret."""

from __future__ import annotations

import hashlib
import secrets
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from sqlalchemy import select, update

from moxco.collector.schema import TOKEN_SCOPES, tokens
from moxco.collector.store.base import StoreError
from moxco.collector.store.runs import check_name


def hash_token(secret: str) -> str:
    """SHA-256 hex digest of a token secret (what the ``tokens`` table stores)."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def _token_dict(row: Mapping[str, Any]) -> Dict[str, Any]:
    return {"id": row["id"], "name": row["name"], "hash": row["hash"], "scopes": row["scopes"].split(),
            "created_at": row["created_at"], "revoked_at": row["revoked_at"]}


class Tokens:
    """Token creation, lookup and revocation (a mixin of ``Store``)."""

    def create_token(self, name: str, scopes: Sequence[str]) -> Tuple[int, str]:
        """Create an API token; returns ``(id, secret)``. Only the SHA-256 of the secret is stored."""
        scopes = sorted(set(scopes))
        bad = [s for s in scopes if s not in TOKEN_SCOPES]
        if bad or not scopes:
            raise StoreError(f"token scopes must be some of {TOKEN_SCOPES}, got {list(scopes)}")
        check_name(name)
        secret = "mox_" + secrets.token_urlsafe(32)  # 256 random bits
        with self._writer.begin() as conn:
            result = conn.execute(tokens.insert().values(name=name, hash=hash_token(secret), scopes=" ".join(scopes),
                                                         created_at=time.time(), revoked_at=None))
            return int(result.inserted_primary_key[0]), secret

    def token_by_hash(self, digest: str) -> Optional[Dict[str, Any]]:
        """The live (not revoked) token whose secret hashes to ``digest``, or None."""
        with self.engine.connect() as conn:
            row = conn.execute(select(tokens).where(tokens.c.hash == digest, tokens.c.revoked_at.is_(None))).mappings().first()
        return None if row is None else _token_dict(row)

    def tokens(self) -> List[Dict[str, Any]]:
        """Every token (never its secret), oldest first."""
        with self.engine.connect() as conn:
            return [_token_dict(row) for row in conn.execute(select(tokens).order_by(tokens.c.id)).mappings()]

    def revoke_token(self, ident: str | int) -> int:
        """Revoke tokens by id or name; returns how many were revoked."""
        with self._writer.begin() as conn:
            where = tokens.c.id == int(ident) if str(ident).isdigit() else tokens.c.name == str(ident)
            result = conn.execute(update(tokens).where(where, tokens.c.revoked_at.is_(None)).values(revoked_at=time.time()))
            return int(result.rowcount)
