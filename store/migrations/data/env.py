from alembic import context

from store.migrations import run_env
from store.models import DataBase

run_env(context, DataBase.metadata)
