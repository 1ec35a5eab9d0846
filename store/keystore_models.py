"""Key-store tables: a separate database by default (keys.db), so data backups carry no keys.
Prefixed `keystore_` so both can share one database when an operator points both URLs at it."""
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
    wrapped: Mapped[bytes] = mapped_column(LargeBinary)  # bound to user_id by the wrap's AAD
    created_at: Mapped[int] = mapped_column(BigInteger)


class Secret(KeysBase):
    """Node-wide keys wrapped by the KEK: the keyed-hash pepper and the FAISS file key."""

    __tablename__ = "keystore_secrets"
    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    kek_version: Mapped[int] = mapped_column(Integer)
    wrapped: Mapped[bytes] = mapped_column(LargeBinary)


class KeyTombstone(KeysBase):
    """The authoritative tombstones: they survive a restore of the data database."""

    __tablename__ = "keystore_tombstones"
    uid_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(BigInteger)
    version: Mapped[int] = mapped_column(Integer, unique=True)
    erased_at: Mapped[int] = mapped_column(BigInteger)


class AuditAnchor(KeysBase):
    """Last audit entry's (seq, hash), kept apart from the log so cutting its tail is detected."""

    __tablename__ = "keystore_audit_anchor"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(BigInteger)
    entry_hash: Mapped[str] = mapped_column(String(64))
