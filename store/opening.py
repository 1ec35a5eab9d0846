"""Opening a store without ever re-keying it silently.

A store is three parts: the data database, the key store and the KEK. A new store is created
only as an explicit act (`userllm admin init`, or the first ingest into an empty USERLLM_HOME),
and only when all of it is absent. A data database whose key store or KEK is missing refuses
to open, naming what is missing and how to restore it: minting fresh keys beside old data would
store everything a second time under keys nobody can use for the old copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from privacy import KekDirectory, KekMissingError, KekProvider, kek_from_env
from store.db import (
    create_owner_only,
    describe,
    holds_schema,
    make_engine,
    resolve_urls,
    sqlite_path,
)
from store.errors import StoreStateError
from store.keystore import KeyStore
from store.migrations import VERSION_TABLES, upgrade


@dataclass(slots=True)
class OpenedParts:
    data: Engine
    keys_engine: Engine
    keys: KeyStore
    created: bool


def unreachable(err: OperationalError, url: str) -> StoreStateError:
    reason = (
        str(getattr(err, "orig", err) or err).strip().splitlines()[0]
        if str(err).strip()
        else type(err).__name__
    )
    return StoreStateError(f"cannot use the database {describe(url)}: {reason}")


def open_parts(
    home: Path, url: str | None, keys_url: str | None, kek: KekProvider | None, create: bool
) -> OpenedParts:
    data_url, keys_url = resolve_urls(home, url, keys_url)
    if sqlite_path(data_url) and sqlite_path(data_url) == sqlite_path(keys_url):
        raise StoreStateError(
            "the data and key databases name the same SQLite file: keep keys.db apart from store.db"
        )
    data, keys_engine = make_engine(data_url), make_engine(keys_url)
    try:
        try:
            data_there = holds_schema(data, VERSION_TABLES["data"])
        except OperationalError as err:
            raise unreachable(err, data_url) from None
        try:
            keys_there = holds_schema(keys_engine, VERSION_TABLES["keys"])
        except OperationalError as err:
            raise unreachable(err, keys_url) from None
        if data_there and not keys_there:
            raise StoreStateError(
                f"the key store {describe(keys_url)} is missing but {describe(data_url)} holds a store: restore the key store from its backup "
                "(a new one would leave every record unreadable)"
            )
        if keys_there and not data_there:
            raise StoreStateError(
                f"the data database {describe(data_url)} is missing but the key store {describe(keys_url)} holds keys: restore it from its backup, "
                "then run `userllm admin restore-check`"
            )
        creating = not data_there
        if creating and not create:
            raise StoreStateError(
                f"no store at {home} (create one with `userllm admin init`, or by a first `userllm ingest`)"
            )
        if kek is None:
            try:
                kek = kek_from_env(home, create=creating)
            except KekMissingError:
                raise StoreStateError(
                    f"the KEK directory {home / 'kek'} is missing or empty but the key store holds keys wrapped by it: restore kek/ from its backup, "
                    "or give the KEK in USERLLM_KEK or USERLLM_KEK_FILE"
                ) from None
            except (OSError, ValueError) as err:
                raise StoreStateError(f"cannot read the KEK: {err}") from None
        if creating:
            home.mkdir(parents=True, exist_ok=True, mode=0o700)
            create_owner_only(data_url)
            create_owner_only(keys_url)
        try:
            upgrade(keys_engine, "keys", kek=kek)
            keys = KeyStore(keys_engine, kek, create=creating)
        except OperationalError as err:
            raise unreachable(err, keys_url) from None
        try:
            upgrade(data, "data", keystore=keys)
        except OperationalError as err:
            raise unreachable(err, data_url) from None
        return OpenedParts(data, keys_engine, keys, creating)
    except BaseException:
        data.dispose()
        keys_engine.dispose()
        raise


def kek_directory(kek: KekProvider) -> KekDirectory | None:
    return kek if isinstance(kek, KekDirectory) else None
