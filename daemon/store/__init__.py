"""Results store: SQLAlchemy schema, per-dialect engine setup, the writer and read queries."""
