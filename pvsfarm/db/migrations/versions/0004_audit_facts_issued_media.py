"""node facts for the audit (DHCP subnet, offline cache age, generation, shared store); issued boot media

Revision ID: 0004
Revises: 0003
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("servers") as batch:
        batch.add_column(sa.Column("dhcp_subnet", sa.String(length=43), nullable=True))
        batch.add_column(sa.Column("offline_cache_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("inventory_generation", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("store_shared", sa.Boolean(), nullable=True))
    op.create_table(
        "issued_media",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("bootstrap_version", sa.Integer(), nullable=False),
        sa.Column("mode", sa.Enum("listed", "live", name="bootstrap_mode", native_enum=False,
                                  create_constraint=True, length=16), nullable=False),
        sa.Column("servers", sa.Text(), nullable=False),
        sa.Column("digest", sa.String(length=71), nullable=False),
        sa.Column("path", sa.String(length=1024), nullable=False),
        sa.Column("actor", sa.String(length=63), nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_issued_media")),
    )


def downgrade() -> None:
    op.drop_table("issued_media")
    with op.batch_alter_table("servers") as batch:
        for column in ("store_shared", "inventory_generation", "offline_cache_at", "dhcp_subnet"):
            batch.drop_column(column)
