"""Alembic's entry point: migrations run on the connection ``vbs_resources.migrations`` hands
over (or on ``sqlalchemy.url`` from alembic.ini when the ``alembic`` command is used)."""

import sqlalchemy as sa
from alembic import context

connection = context.config.attributes.get("connection")
if connection is None:
    engine = sa.create_engine(context.config.get_main_option("sqlalchemy.url"))
    with engine.begin() as connection:
        context.configure(connection=connection, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
else:
    context.configure(connection=connection, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
