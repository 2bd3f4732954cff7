"""The error boundary of the identifiable zone.

Anything raised while the inbox is read can quote what it was reading: an OS error carries the path
(``<accession>/<NAME>_<MRN>_002.jpg``), a decoder or database error can quote a value. What leaves the
boundary (to Dagster's event log, compute logs, tick storage, the daemon log, the UI) is a
``ContainedError``: the operation, the smear pseudonym, and the error's type, never its text or its
chain of causes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class ContainedError(RuntimeError):
    """An error whose message is safe to show: it names no path, file or value from the inbox."""


@contextmanager
def identifiable_zone(operation: str, smear_id: str | None = None, safe: tuple[type[Exception], ...] = ()) -> Iterator[None]:
    """Run ``operation`` so that any failure leaves as a ``ContainedError`` with no cause attached.
    ``safe`` lists error types whose messages are redacted by construction (the pseudonymisation set-up
    errors, say); they pass unchanged, so the operator reads what to fix."""
    passed_through: tuple[type[Exception], ...] = (ContainedError, *safe)
    try:
        yield
    except passed_through:
        raise
    except Exception as error:  # noqa: BLE001 - every kind must be contained, that is the point
        where = f" for smear {smear_id}" if smear_id else ""
        raise ContainedError(
            f"{operation} failed{where}: {type(error).__name__} (its text is withheld because it can quote "
            "inbox paths or values; re-run the step, or run the import by hand in the identifiable zone "
            "to see it)"
        ) from None
