"""Where the pipeline keeps things: object stores (local or S3) and the DuckDB warehouse."""
