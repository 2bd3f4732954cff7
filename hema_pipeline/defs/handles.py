"""How the small handles that assets pass each other are stored: JSON in the lake, under stable names.

Dagster's default IO manager pickles outputs to the local disk of the process that ran the step. That
breaks twice: a pickle names the class by its import path, so moving ``DatasetHandle`` or ``ModelCard``
makes every stored materialisation unloadable; and at scale each run (and, under ``k8s_job_executor``,
each step) is a pod with its own disk, so a downstream step could not read its input at all.

Here a handle is written as ``{"handle": <stable name>, "value": {...fields}}`` to
``dagster/handles/<asset key>[/<partition>].json`` in the lake (a folder, or S3 at scale). The stable
name maps to the class's current import path in ``HANDLE_TYPES``: a refactor moves a class and edits one
line there, and everything stored before still loads. Handles hold versions, keys and metrics, never
patient data (the lake is the anonymised zone). Plain JSON values (a champion's version string, the flag
thresholds) are stored as ``{"handle": "json", "value": ...}``.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import typing
from typing import Any

import dagster as dg

from hema_pipeline.storage.object_store import ObjectStore, open_object_store

HANDLE_PREFIX = "dagster/handles"
PLAIN_JSON = "json"

# Stable name -> "module:Class". Never rename a key (stored handles carry it); edit the path when a class moves.
HANDLE_TYPES: dict[str, str] = {
    "CellSnapshot": "hema_pipeline.defs.quality:CellSnapshot",
    "DatasetHandle": "hema_pipeline.datasets.versioning:DatasetHandle",
    "TrainedModelHandle": "hema_pipeline.modeling.stage:TrainedModelHandle",
    "CalibrationHandle": "hema_pipeline.modeling.stage:CalibrationHandle",
    "ModelCard": "hema_pipeline.modeling.registry:ModelCard",
}


class UnknownHandle(TypeError):
    """A value no stable name is registered for, or a stored name this code does not know."""


def handle_class(name: str) -> type:
    try:
        module, _, attribute = HANDLE_TYPES[name].partition(":")
    except KeyError:
        raise UnknownHandle(f"stored handle type {name!r} is not in HANDLE_TYPES (written by a newer version?)") from None
    return getattr(importlib.import_module(module), attribute)


def _stable_name(value: object) -> str:
    for name, path in HANDLE_TYPES.items():
        module, _, attribute = path.partition(":")
        if type(value).__module__ == module and type(value).__name__ == attribute:
            return name
    raise UnknownHandle(
        f"{type(value).__module__}.{type(value).__qualname__} has no stable name in HANDLE_TYPES: register it "
        "(only small handles cross asset boundaries; data goes to the lake)"
    )


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _plain(value.item())
    return value


def encode_handle(value: object) -> str:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        document = {"handle": _stable_name(value), "value": _plain(dataclasses.asdict(value))}
    elif value is None or isinstance(value, (str, int, float, bool, list, dict)):
        document = {"handle": PLAIN_JSON, "value": _plain(value)}
    else:
        raise UnknownHandle(f"{type(value).__qualname__} cannot be stored as a handle")
    # allow_nan: a threshold may be infinite, and only this module reads the files back (Python's JSON
    # round-trips NaN and Infinity exactly).
    return json.dumps(document, sort_keys=True, allow_nan=True, indent=1)


def _as_declared(kind: Any, value: Any) -> Any:
    """JSON has lists only: give tuple fields their tuples back (``classes: tuple[str, ...]``)."""
    if typing.get_origin(kind) is tuple and isinstance(value, list):
        return tuple(value)
    return value


def decode_handle(text: str) -> object:
    document = json.loads(text)
    name, value = document["handle"], document["value"]
    if name == PLAIN_JSON:
        return value
    cls = handle_class(name)
    declared = typing.get_type_hints(cls)
    known = {item.name for item in dataclasses.fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise UnknownHandle(f"stored {name} has fields {unknown} this code does not know (written by a newer version?)")
    return cls(**{key: _as_declared(declared.get(key), item) for key, item in value.items()})


class HandleIOManager(dg.ConfigurableIOManager):
    """Stores asset outputs as JSON handles in the lake (see the module docstring)."""

    lake_url: str
    s3_endpoint_url: str = ""

    def _store(self) -> ObjectStore:
        return open_object_store(self.lake_url, endpoint_url=self.s3_endpoint_url or None)

    @staticmethod
    def _key(context: dg.OutputContext | dg.InputContext) -> str:
        key = "/".join([HANDLE_PREFIX, *context.asset_key.path])
        if context.has_asset_partitions:
            key += f"/{context.asset_partition_key}"
        return f"{key}.json"

    def handle_output(self, context: dg.OutputContext, obj: object) -> None:
        if obj is None and context.dagster_type.is_nothing:
            return
        self._store().put_bytes(self._key(context), encode_handle(obj).encode())

    def load_input(self, context: dg.InputContext) -> object:
        return decode_handle(self._store().get_bytes(self._key(context)).decode())
