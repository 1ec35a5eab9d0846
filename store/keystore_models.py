"""Key-store tables: a separate database by default (keys.db), so data backups carry no keys.
Prefixed `keystore_` so both can share one PostgreSQL database when an operator points both
URLs at it."""

from __future__ import annotations

from sqlalchemy import BigInteger, Integer, LargeBinary, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class KeysBase(DeclarativeBase):
    pass


class DataKey(KeysBase):
    __tablename__ = "keystore_data_keys"
    user_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    uid_hash: Mapped[str] = mapped_column(String(64), unique=True)
    kek_version: Mapped[int] = mapped_column(Integer)
    # Wrapped under the KEK with both ids in the wrap's AAD: the row authenticates the link
    # from the user's keyed id to their internal id and key.
    wrapped: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[int] = mapped_column(BigInteger)


class Secret(KeysBase):
    """Node-wide keys wrapped by the KEK: the keyed-hash pepper, the FAISS file key, the MAC key."""

    __tablename__ = "keystore_secrets"
    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    kek_version: Mapped[int] = mapped_column(Integer)
    wrapped: Mapped[bytes] = mapped_column(LargeBinary)


class KeyTombstone(KeysBase):
    """The authoritative tombstones: they survive a restore of the data database. `mac` binds
    every field; `kek_version` is the KEK version that wrapped the shredded key (a backup of the
    key store from before the erasure opens it while that version exists)."""

    __tablename__ = "keystore_tombstones"
    uid_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(BigInteger)
    version: Mapped[int] = mapped_column(Integer, unique=True)
    erased_at: Mapped[int] = mapped_column(BigInteger)
    kek_version: Mapped[int] = mapped_column(Integer)
    mac: Mapped[str] = mapped_column(String(64))


class AuditAnchor(KeysBase):
    """The audit log's tail as last written (seq, entry_hash) and the tail before it (prior_*):
    the log must end at one of the two (the second covers a crash between the two commits).
    Kept apart from the log, with a MAC, so cutting, rolling back or extending the log is seen."""

    __tablename__ = "keystore_audit_anchor"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(BigInteger)
    entry_hash: Mapped[str] = mapped_column(String(64))
    prior_seq: Mapped[int] = mapped_column(BigInteger)
    prior_hash: Mapped[str] = mapped_column(String(64))
    mac: Mapped[str] = mapped_column(String(64))
