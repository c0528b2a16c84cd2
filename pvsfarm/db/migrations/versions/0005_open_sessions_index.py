"""partial index on open stream sessions per server (the heartbeat's load count)

Revision ID: 0005
Revises: 0004
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_stream_sessions_open_server", "stream_sessions", ["server_id"],
                    postgresql_where=sa.text("ended_at IS NULL"), sqlite_where=sa.text("ended_at IS NULL"))


def downgrade() -> None:
    op.drop_index("ix_stream_sessions_open_server", table_name="stream_sessions")
