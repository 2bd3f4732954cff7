"""Data-quality checks over the warehouse tables (Great Expectations 1.x), as plain typed results."""
