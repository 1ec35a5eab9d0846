"""The store's expected failures. Each message is one line that names what failed and what to
do, never a record's contents; the CLI prints it and exits with status 2."""

from __future__ import annotations


class StoreError(Exception):
    """Base of the store's expected failures."""


class StoreIntegrityError(StoreError):
    """Stored data does not authenticate where it is read: altered, moved between users, or a
    mapping that no longer matches its keys. Nothing is returned and nothing is changed."""


class StoreStateError(StoreError):
    """The store cannot be opened as it is: a part is missing (key store, KEK), it does not
    exist yet, or the databases cannot be reached."""
