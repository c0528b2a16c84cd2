"""farm settings rows created once, at upgrade (no insert races between nodes)

Revision ID: 0003
Revises: 0002
"""
import secrets

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

settings = sa.table("farm_settings", sa.column("key", sa.String), sa.column("value", sa.Text))


def _ensure(key: str, value: str) -> None:
    conn = op.get_bind()
    exists = conn.execute(sa.select(settings.c.key).where(settings.c.key == key)).first()
    if exists is None:
        conn.execute(settings.insert().values(key=key, value=value))


def upgrade() -> None:
    _ensure("export_token_secret", secrets.token_hex(32))
    _ensure("inventory_generation", "1")


def downgrade() -> None:
    pass
