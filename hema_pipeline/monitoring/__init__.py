"""Watching the running pipeline: when to retrain a task, and a record of failed runs. Reads the
warehouse tables every stage writes (their SQL is the interface), never a stage's internals."""
