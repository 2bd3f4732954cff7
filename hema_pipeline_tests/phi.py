"""The PHI canary's search: every byte of what the pipeline writes, and every decoded value of its
DuckDB and Parquet files (their compression can hide a string from a byte search)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import duckdb
import pandas as pd


def _variants(needle: str) -> set[bytes]:
    forms = {needle, needle.lower(), needle.upper()}
    return {form.encode("utf-8") for form in forms} | {form.encode("utf-16-le") for form in forms}


def byte_hits(roots: Iterable[Path], needles: Iterable[str]) -> list[tuple[str, str]]:
    patterns = {needle: _variants(needle) for needle in needles}
    hits = []
    for root in roots:
        paths = [root] if root.is_file() else sorted(path for path in root.rglob("*") if path.is_file())
        for path in paths:
            data = path.read_bytes()
            lowered = data.lower()
            for needle, forms in patterns.items():
                if any(form in data or form.lower() in lowered for form in forms):
                    hits.append((str(path), needle))
    return hits


def _frame_text(frame: pd.DataFrame) -> str:
    return (" ".join(frame.columns) + "\n" + frame.astype(str).to_csv(index=False)).lower()


def decoded_hits(duckdb_files: Iterable[Path], parquet_roots: Iterable[Path], needles: Iterable[str]) -> list[tuple[str, str]]:
    texts: list[tuple[str, str]] = []
    for path in duckdb_files:
        with duckdb.connect(str(path), read_only=True) as connection:
            tables = [row[0] for row in connection.execute("select table_name from information_schema.tables").fetchall()]
            for table in tables:
                texts.append((f"{path}:{table}", _frame_text(connection.execute(f'select * from "{table}"').df())))
    for root in parquet_roots:
        for path in sorted(root.rglob("*.parquet")):
            texts.append((str(path), _frame_text(pd.read_parquet(path))))
    return [(where, needle) for where, text in texts for needle in needles if needle.lower() in text]
