"""Which smears can leave Dagster's live partition set (issue 17: growth bounded by design).

One dynamic partition per smear is 5,000 partitions a day at network scale, 1.8 million a year, against
Dagster's advice to stay under about 100,000 per asset. A smear is *settled* once its latest import
finished more than the retention period ago and it either has a report (it was predicted) or has no
imported cell (nothing to predict): its partition can be deleted. Everything about it stays: the
warehouse keeps its import runs, cells, predictions and reports; Dagster keeps its runs and
materialisation events. What changes is that it is no longer re-predicted when a champion changes (a
window, not the lab's history), and that a new export of it simply adds the partition again.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

from hema_pipeline.storage.warehouse import Warehouse, table_exists

# Live partitions are looked up in chunks, so each hourly pass costs the live set (about 70,000 at network
# scale), not every smear ever imported.
_CHUNK = 1000


def _settled_sql(count: int) -> str:
    return f"""
select i.smear_id, max(i.finished_at) as last_import
from import_runs i
where i.smear_id in ({", ".join("?" for _ in range(count))})
group by i.smear_id
having max(i.finished_at) < ?
   and (
        exists (select 1 from smear_reports r where r.smear_id = i.smear_id)
        or not exists (select 1 from cells c where c.smear_id = i.smear_id)
   )
"""


def settled_smears(warehouse: Warehouse, live: Iterable[str], imported_before: dt.datetime, limit: int) -> list[str]:
    """Up to ``limit`` live partitions whose smear is settled (see the module), oldest import first.
    Read-only; a warehouse without the tables yet settles nothing."""
    candidates = sorted(set(live))
    if not candidates or limit < 1 or not warehouse.exists():
        return []
    cutoff = imported_before.replace(tzinfo=None)
    settled: list[tuple[object, str]] = []
    with warehouse.connect(read_only=True) as connection:
        if not all(table_exists(connection, table) for table in ("import_runs", "smear_reports", "cells")):
            return []
        for start in range(0, len(candidates), _CHUNK):
            chunk = candidates[start : start + _CHUNK]
            rows = connection.execute(_settled_sql(len(chunk)), [*chunk, cutoff]).fetchall()
            settled.extend((last_import, smear_id) for smear_id, last_import in rows)
    return [smear_id for _, smear_id in sorted(settled)][:limit]
