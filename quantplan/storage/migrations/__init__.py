"""Alembic migrations of the QuantPlan schema (run them with `storage.migrate`)."""
