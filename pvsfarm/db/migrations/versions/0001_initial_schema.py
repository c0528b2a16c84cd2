"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-26 11:51:42.985476
"""
from alembic import op
import sqlalchemy as sa


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('audit_log',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('actor', sa.String(length=63), nullable=False),
    sa.Column('action', sa.String(length=63), nullable=False),
    sa.Column('object_type', sa.String(length=31), nullable=False),
    sa.Column('object_name', sa.String(length=255), nullable=False),
    sa.Column('detail', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_log'))
    )
    op.create_table('bootstrap',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('mode', sa.Enum('listed', 'live', name='bootstrap_mode', native_enum=False, create_constraint=True, length=16), nullable=False),
    sa.Column('timeout_ms', sa.Integer(), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_bootstrap'))
    )
    op.create_table('collections',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=63), nullable=False),
    sa.Column('description', sa.String(length=255), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_collections')),
    sa.UniqueConstraint('name', name=op.f('uq_collections_name'))
    )
    op.create_table('servers',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=63), nullable=False),
    sa.Column('address', sa.String(length=255), nullable=False),
    sa.Column('http_port', sa.Integer(), nullable=False),
    sa.Column('nbd_port', sa.Integer(), nullable=False),
    sa.Column('tftp_port', sa.Integer(), nullable=False),
    sa.Column('state', sa.Enum('up', 'draining', 'down', name='server_state', native_enum=False, create_constraint=True, length=16), nullable=False),
    sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('load', sa.Integer(), nullable=False),
    sa.Column('health', sa.String(length=255), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_servers')),
    sa.UniqueConstraint('name', name=op.f('uq_servers_name'))
    )
    op.create_table('vdisks',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=63), nullable=False),
    sa.Column('size_bytes', sa.BigInteger(), nullable=False),
    sa.Column('mode', sa.Enum('standard', 'private', name='vdisk_mode', native_enum=False, create_constraint=True, length=16), nullable=False),
    sa.Column('cache_type', sa.Enum('server', 'device-ram', name='cache_type', native_enum=False, create_constraint=True, length=16), nullable=False),
    sa.Column('digest', sa.String(length=71), nullable=False),
    sa.Column('boot_method', sa.Enum('sanboot', 'kernel', name='boot_method', native_enum=False, create_constraint=True, length=16), nullable=False),
    sa.Column('file_name', sa.String(length=255), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_vdisks')),
    sa.UniqueConstraint('name', name=op.f('uq_vdisks_name'))
    )
    op.create_table('bootstrap_servers',
    sa.Column('bootstrap_id', sa.Integer(), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('server_id', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['bootstrap_id'], ['bootstrap.id'], name=op.f('fk_bootstrap_servers_bootstrap_id_bootstrap'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['server_id'], ['servers.id'], name=op.f('fk_bootstrap_servers_server_id_servers'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('bootstrap_id', 'position', name=op.f('pk_bootstrap_servers')),
    sa.UniqueConstraint('bootstrap_id', 'server_id', name='uq_bootstrap_servers_server')
    )
    op.create_table('devices',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('mac', sa.String(length=17), nullable=False),
    sa.Column('name', sa.String(length=63), nullable=False),
    sa.Column('ipv4', sa.String(length=15), nullable=True),
    sa.Column('collection_id', sa.Integer(), nullable=False),
    sa.Column('vdisk_id', sa.Integer(), nullable=True),
    sa.Column('enabled', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['collection_id'], ['collections.id'], name=op.f('fk_devices_collection_id_collections'), ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['vdisk_id'], ['vdisks.id'], name=op.f('fk_devices_vdisk_id_vdisks'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_devices')),
    sa.UniqueConstraint('ipv4', name=op.f('uq_devices_ipv4')),
    sa.UniqueConstraint('mac', name=op.f('uq_devices_mac')),
    sa.UniqueConstraint('name', name=op.f('uq_devices_name'))
    )
    op.create_table('stores',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('server_id', sa.Integer(), nullable=True),
    sa.Column('path', sa.String(length=1024), nullable=False),
    sa.Column('shared', sa.Boolean(), nullable=False),
    sa.ForeignKeyConstraint(['server_id'], ['servers.id'], name=op.f('fk_stores_server_id_servers'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_stores')),
    sa.UniqueConstraint('server_id', 'path', name='uq_stores_server_path')
    )
    op.create_table('vdisk_copies',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('vdisk_id', sa.Integer(), nullable=False),
    sa.Column('server_id', sa.Integer(), nullable=False),
    sa.Column('path', sa.String(length=1024), nullable=False),
    sa.Column('digest', sa.String(length=71), nullable=True),
    sa.Column('state', sa.Enum('verified', 'copying', 'stale', 'missing', name='copy_state', native_enum=False, create_constraint=True, length=16), nullable=False),
    sa.Column('progress_pct', sa.Integer(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['server_id'], ['servers.id'], name=op.f('fk_vdisk_copies_server_id_servers'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['vdisk_id'], ['vdisks.id'], name=op.f('fk_vdisk_copies_vdisk_id_vdisks'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_vdisk_copies')),
    sa.UniqueConstraint('vdisk_id', 'server_id', name='uq_vdisk_copies_vdisk_server')
    )
    op.create_table('stream_sessions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('token', sa.String(length=64), nullable=False),
    sa.Column('device_id', sa.Integer(), nullable=False),
    sa.Column('server_id', sa.Integer(), nullable=False),
    sa.Column('vdisk_id', sa.Integer(), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_io_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('bytes_read', sa.BigInteger(), nullable=False),
    sa.Column('bytes_written', sa.BigInteger(), nullable=False),
    sa.Column('ended_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['device_id'], ['devices.id'], name=op.f('fk_stream_sessions_device_id_devices'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['server_id'], ['servers.id'], name=op.f('fk_stream_sessions_server_id_servers'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['vdisk_id'], ['vdisks.id'], name=op.f('fk_stream_sessions_vdisk_id_vdisks'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_stream_sessions')),
    sa.UniqueConstraint('token', name=op.f('uq_stream_sessions_token'))
    )
    with op.batch_alter_table('stream_sessions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_stream_sessions_device_id'), ['device_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_stream_sessions_server_id'), ['server_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('stream_sessions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_stream_sessions_server_id'))
        batch_op.drop_index(batch_op.f('ix_stream_sessions_device_id'))

    op.drop_table('stream_sessions')
    op.drop_table('vdisk_copies')
    op.drop_table('stores')
    op.drop_table('devices')
    op.drop_table('bootstrap_servers')
    op.drop_table('vdisks')
    op.drop_table('servers')
    op.drop_table('collections')
    op.drop_table('bootstrap')
    op.drop_table('audit_log')
