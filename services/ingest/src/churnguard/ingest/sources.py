"""Sources and their write keys: how a sender of events proves who it is.

A *source* is one sender of events (a website, a backend, a CRM export). It authenticates
with a write key of the form ``cg_live_`` + 32 URL-safe characters. Those 32 characters
come from :func:`secrets.token_urlsafe` over 24 random bytes, so a key carries 192 bits of
entropy.

Only ``sha256(key)`` (hex) is stored, plus the key's first 12 characters
(``write_key_prefix``) so that operators can tell keys apart in a listing. A fast hash
is the right tool here, unlike for passwords: a slow, salted hash (bcrypt, argon2)
protects *low-entropy* secrets against guessing, and nobody can enumerate 2**192
candidates however fast the hash is. GitHub and Stripe store their API tokens the same way.
A plain hash also makes lookup a unique-index probe (``write_key_hash = $1``), which a
salted hash could not be.

The plain key exists only in the return value of :meth:`SourceRepository.create`: it is
shown once to whoever created the source and is never stored or logged.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import hashlib
import secrets
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from sqlalchemy import DateTime, Text, func, or_, select, update
from sqlalchemy.dialects.postgresql import UUID, insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from churnguard.common.db import metadata_for

__all__ = [
    "KEY_PREFIX",
    "AmbiguousSource",
    "Source",
    "SourceExists",
    "SourceNotFound",
    "SourceRepository",
    "Unauthorized",
    "WriteKeyAuthenticator",
    "generate_write_key",
    "hash_write_key",
]

KEY_PREFIX: Final = "cg_live_"
_RANDOM_BYTES: Final = 24  # base64url of 24 bytes is exactly 32 characters, 192 bits
KEY_LENGTH: Final = len(KEY_PREFIX) + 32
DISPLAY_PREFIX_LENGTH: Final = 12
"""``cg_live_`` plus four random characters: enough to tell a handful of keys apart."""


class Base(DeclarativeBase):
    metadata = metadata_for()


class SourceRow(Base):
    """A row of ``sources`` (see migration 0001). Only this module reads the hash."""

    __tablename__ = "sources"

    id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), primary_key=True, server_default=func.gen_random_uuid()
    )
    name: Mapped[str] = mapped_column(Text, unique=True)
    write_key_hash: Mapped[str] = mapped_column(Text, unique=True)
    write_key_prefix: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


@dataclass(frozen=True, slots=True)
class Source:
    """A source as the rest of the service sees it: never the key, never its hash."""

    id: uuid.UUID
    name: str
    write_key_prefix: str | None
    created_at: datetime
    revoked_at: datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


# The public columns, in Source's field order; write_key_hash is deliberately absent.
_PUBLIC_COLUMNS = (
    SourceRow.id,
    SourceRow.name,
    SourceRow.write_key_prefix,
    SourceRow.created_at,
    SourceRow.revoked_at,
)


class SourceExists(Exception):
    def __init__(self, name: str) -> None:
        super().__init__(f"a source named {name!r} already exists")
        self.name = name


class SourceNotFound(LookupError):
    def __init__(self, name_or_prefix: str) -> None:
        super().__init__(f"no source with the name or key prefix {name_or_prefix!r}")
        self.name_or_prefix = name_or_prefix


class AmbiguousSource(LookupError):
    """A key prefix that matches more than one source (use the name instead)."""

    def __init__(self, prefix: str, names: builtins.list[str]) -> None:
        super().__init__(
            f"the key prefix {prefix!r} matches {len(names)} sources "
            f"({', '.join(sorted(names))}); revoke by name instead"
        )
        self.prefix = prefix
        self.names = names


def generate_write_key() -> str:
    """A new write key: ``cg_live_`` + 32 URL-safe characters (192 random bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(_RANDOM_BYTES)


def hash_write_key(plain_key: str) -> str:
    """What the table stores and is searched by: the SHA-256 of the key, in hex."""
    return hashlib.sha256(plain_key.encode()).hexdigest()


def _looks_like_write_key(candidate: str) -> bool:
    return len(candidate) == KEY_LENGTH and candidate.startswith(KEY_PREFIX)


class SourceRepository:
    """Queries on ``sources``. It adds, reads and flushes; the caller's boundary commits."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def create(self, name: str) -> tuple[Source, str]:
        """A new source and its plain write key, the only time the key is ever available.

        Raises :class:`SourceExists` when the name is taken. The insert uses
        ``ON CONFLICT (name) DO NOTHING`` so a duplicate leaves the caller's transaction
        usable (no aborted transaction to roll back).
        """
        plain_key = generate_write_key()
        statement = (
            insert(SourceRow)
            .values(
                name=name,
                write_key_hash=hash_write_key(plain_key),
                write_key_prefix=plain_key[:DISPLAY_PREFIX_LENGTH],
            )
            .on_conflict_do_nothing(index_elements=[SourceRow.name])
            .returning(*_PUBLIC_COLUMNS)
        )
        row = (await self._session.execute(statement)).one_or_none()
        if row is None:
            raise SourceExists(name)
        return Source(*row), plain_key

    async def list(self) -> builtins.list[Source]:
        """Every source, oldest first, revoked ones included (they show ``revoked_at``)."""
        statement = select(*_PUBLIC_COLUMNS).order_by(SourceRow.created_at, SourceRow.name)
        return [Source(*row) for row in await self._session.execute(statement)]

    async def revoke(self, name_or_prefix: str) -> Source:
        """Revoke a source by name or key prefix; revoking it again changes nothing.

        A name wins over a prefix. ``revoked_at`` keeps the time of the first revocation.
        Raises :class:`SourceNotFound`, or :class:`AmbiguousSource` when a prefix matches
        several sources.
        """
        candidates = (
            await self._session.execute(
                select(SourceRow.id, SourceRow.name).where(
                    or_(
                        SourceRow.name == name_or_prefix,
                        SourceRow.write_key_prefix == name_or_prefix,
                    )
                )
            )
        ).all()
        by_name = [row.id for row in candidates if row.name == name_or_prefix]
        if by_name:
            target = by_name[0]
        elif len(candidates) == 1:
            target = candidates[0].id
        elif candidates:
            raise AmbiguousSource(name_or_prefix, [row.name for row in candidates])
        else:
            raise SourceNotFound(name_or_prefix)
        statement = (
            update(SourceRow)
            .where(SourceRow.id == target)
            .values(revoked_at=func.coalesce(SourceRow.revoked_at, func.now()))
            .returning(*_PUBLIC_COLUMNS)
        )
        return Source(*(await self._session.execute(statement)).one())

    async def find_active_by_key(self, plain_key: str) -> Source | None:
        """The unrevoked source this key belongs to, if any (a unique-index lookup)."""
        statement = select(*_PUBLIC_COLUMNS).where(
            SourceRow.write_key_hash == hash_write_key(plain_key),
            SourceRow.revoked_at.is_(None),
        )
        row = (await self._session.execute(statement)).one_or_none()
        return None if row is None else Source(*row)


class Unauthorized(Exception):
    """A request without a usable write key. ``reason`` never contains the key."""

    www_authenticate: Final = 'Basic realm="churnguard", charset="UTF-8"'

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class WriteKeyAuthenticator:
    """Turns an ``Authorization`` header into the :class:`Source` that sent it.

    Accepted forms:

    * ``Basic base64("<key>:")``: the key as user name and an empty password, which is
      what the Segment and RudderStack libraries send;
    * ``Bearer <key>``.

    **Cache.** Results are kept per key hash for ``cache_ttl_s`` seconds, both positive
    (the source) and negative (unknown or revoked), so a busy sender costs one PostgreSQL
    query per TTL rather than one per request, and a client retrying a bad key cannot make
    every attempt a query. The price is staleness bounded by the TTL: a key revoked in
    PostgreSQL (by the CLI, by another replica) keeps working in this process for at most
    ``cache_ttl_s`` after the revocation commits. A *new* key is never delayed by the
    negative cache, because nobody can have presented a 192-bit random key before it was
    created. The cache holds at most ``max_entries`` keys (oldest evicted first) so a flood
    of random keys cannot grow memory without bound; database errors are never cached.

    **No constant-time comparison.** The lookup is ``WHERE write_key_hash = sha256(key)``:
    what an attacker could time is an index probe on a SHA-256 digest, which reveals
    nothing usable about a stored key (learning a digest's prefix does not help find a
    preimage), so ``hmac.compare_digest`` would protect nothing here.
    """

    def __init__(
        self,
        session_factory: async_sessionmaker[AsyncSession],
        cache_ttl_s: float = 5.0,
        *,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if cache_ttl_s < 0:
            raise ValueError("cache_ttl_s must be >= 0")
        self._sessions = session_factory
        self._ttl = cache_ttl_s
        self._max_entries = max_entries
        self._clock = clock
        # key hash -> (expires at, source or None for "no such active key")
        self._cache: OrderedDict[str, tuple[float, Source | None]] = OrderedDict()

    async def authenticate(self, authorization_header: str | None) -> Source:
        """The active source owning the presented key; :class:`Unauthorized` otherwise."""
        plain_key = _key_from_header(authorization_header)
        source = await self._lookup(plain_key)
        if source is None:
            # one reason for both: telling a caller which keys once existed helps nobody
            raise Unauthorized("unknown or revoked write key")
        return source

    def clear_cache(self) -> None:
        """Forget every cached result (for a revocation made in this process)."""
        self._cache.clear()

    async def _lookup(self, plain_key: str) -> Source | None:
        key_hash = hash_write_key(plain_key)
        now = self._clock()
        cached = self._cache.get(key_hash)
        if cached is not None and cached[0] > now:
            return cached[1]
        async with self._sessions() as session, session.begin():
            source = await SourceRepository(session).find_active_by_key(plain_key)
        self._remember(key_hash, source, self._clock() + self._ttl)
        return source

    def _remember(self, key_hash: str, source: Source | None, expires_at: float) -> None:
        if self._ttl <= 0:
            return
        self._cache.pop(key_hash, None)
        self._cache[key_hash] = (expires_at, source)
        while len(self._cache) > self._max_entries:
            self._cache.popitem(last=False)


def _key_from_header(header: str | None) -> str:
    """The write key inside an ``Authorization`` header; reasons never repeat the key."""
    if header is None or not header.strip():
        raise Unauthorized("missing Authorization header")
    scheme, _, credentials = header.strip().partition(" ")
    credentials = credentials.strip()
    match scheme.lower():
        case "basic":
            key = _key_from_basic(credentials)
        case "bearer":
            if not credentials:
                raise Unauthorized("malformed Authorization header: Bearer without a token")
            key = credentials
        case _:
            raise Unauthorized(
                "malformed Authorization header: use Basic (write key as user name, "
                "empty password) or Bearer"
            )
    if not _looks_like_write_key(key):
        raise Unauthorized(
            f"malformed write key: expected {KEY_PREFIX!r} followed by 32 characters"
        )
    return key


def _key_from_basic(credentials: str) -> str:
    try:
        decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):  # ValueError: non-ASCII input; UnicodeDecodeError is one
        raise Unauthorized(
            "malformed Authorization header: Basic credentials are not base64 of UTF-8"
        ) from None
    user, colon, password = decoded.partition(":")
    if not colon or not user:
        raise Unauthorized(
            "malformed Authorization header: Basic credentials must be '<write key>:'"
        )
    if password:
        raise Unauthorized(
            "malformed Authorization header: send the write key as the user name "
            "with an empty password"
        )
    return user
