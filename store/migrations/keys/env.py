from alembic import context

from store.keystore_models import KeysBase
from store.migrations import run_env

run_env(context, KeysBase.metadata)
