"""Initial schema: models, jobs, sensitivity_tables, plans, metrics, artifacts.

Revision ID: 0001
Revises:
Create Date: 2026-05-10
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from quantplan.storage.models import JsonType, UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("revision", sa.String(255), nullable=True),
        sa.Column("fingerprint", sa.String(128), nullable=False),
        sa.Column("parameter_count", sa.BigInteger(), nullable=True),
        sa.Column("architecture", sa.String(255), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_models"),
        sa.UniqueConstraint("fingerprint", name="uq_models_fingerprint"),
    )
    op.create_index("ix_models_name", "models", ["name"])
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("spec", JsonType, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("stage", sa.String(64), nullable=True),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("runner", sa.String(255), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("heartbeat_at", UTCDateTime(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=True),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
        sa.Column("submitter", sa.String(255), nullable=True),
        sa.Column("idempotency_key", sa.String(255), nullable=True),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')", name="ck_jobs_status"
        ),
        sa.CheckConstraint("progress >= 0 AND progress <= 1", name="ck_jobs_progress"),
        sa.CheckConstraint("attempts >= 0", name="ck_jobs_attempts"),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
        sa.UniqueConstraint("idempotency_key", name="uq_jobs_idempotency_key"),
    )
    op.create_index("ix_jobs_status_created_at", "jobs", ["status", "created_at"])
    op.create_table(
        "sensitivity_tables",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(512), nullable=False),
        sa.Column("artifact_uri", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=True),
        sa.Column("model_id", sa.Integer(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_id"], ["models.id"], name="fk_sensitivity_tables_model_id_models", ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_sensitivity_tables"),
        sa.UniqueConstraint("key", name="uq_sensitivity_tables_key"),
    )
    op.create_index("ix_sensitivity_tables_model_id", "sensitivity_tables", ["model_id"])
    op.create_table(
        "plans",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=True),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("plan", JsonType, nullable=False),
        sa.Column("plan_sha256", sa.String(64), nullable=False),
        sa.Column("avg_bits", sa.Float(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("act_bits", sa.Integer(), nullable=False),
        sa.Column("predicted_loss", sa.Float(), nullable=True),
        sa.Column("is_pareto", sa.Boolean(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.CheckConstraint("avg_bits > 0", name="ck_plans_avg_bits"),
        sa.CheckConstraint("bytes >= 0", name="ck_plans_bytes"),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name="fk_plans_job_id_jobs", ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], name="fk_plans_model_id_models", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_plans"),
        sa.UniqueConstraint("job_id", "plan_sha256", name="uq_plans_job_id_plan_sha256"),
    )
    op.create_index("ix_plans_job_id", "plans", ["job_id"])
    op.create_index("ix_plans_model_id_avg_bits", "plans", ["model_id", "avg_bits"])
    op.create_table(
        "metrics",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("plan_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("dataset", sa.String(255), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["plan_id"], ["plans.id"], name="fk_metrics_plan_id_plans", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_metrics"),
        sa.UniqueConstraint("plan_id", "name", "dataset", name="uq_metrics_plan_id_name_dataset"),
    )
    op.create_index("ix_metrics_name_dataset", "metrics", ["name", "dataset"])
    op.create_table(
        "artifacts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("plan_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("uri", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.CheckConstraint("bytes >= 0", name="ck_artifacts_bytes"),
        sa.ForeignKeyConstraint(["plan_id"], ["plans.id"], name="fk_artifacts_plan_id_plans", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_artifacts"),
        sa.UniqueConstraint("plan_id", "kind", name="uq_artifacts_plan_id_kind"),
    )


def downgrade() -> None:
    op.drop_table("artifacts")
    op.drop_index("ix_metrics_name_dataset", table_name="metrics")
    op.drop_table("metrics")
    op.drop_index("ix_plans_model_id_avg_bits", table_name="plans")
    op.drop_index("ix_plans_job_id", table_name="plans")
    op.drop_table("plans")
    op.drop_index("ix_sensitivity_tables_model_id", table_name="sensitivity_tables")
    op.drop_table("sensitivity_tables")
    op.drop_index("ix_jobs_status_created_at", table_name="jobs")
    op.drop_table("jobs")
    op.drop_index("ix_models_name", table_name="models")
    op.drop_table("models")
