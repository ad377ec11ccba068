"""The DuckDB store: the connection discipline (`db`) and the schema (`migrations`)."""
