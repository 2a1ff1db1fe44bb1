"""Alembic environment: the URL comes from `api.db.run_migrations` or the service settings."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool
from sqlalchemy.engine import make_url

from api.config import get_settings
from api.db import normalise_url
from api.models import Base

config = context.config
target_metadata = Base.metadata

url = normalise_url(
    config.attributes.get("url")
    or config.get_main_option("sqlalchemy.url")
    or get_settings().resolved_database_url
)
# SQLite cannot ALTER most things in place; batch mode rebuilds the table instead.
render_as_batch = make_url(url).get_backend_name() == "sqlite"


def run_migrations_offline() -> None:
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=render_as_batch,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=render_as_batch,
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
