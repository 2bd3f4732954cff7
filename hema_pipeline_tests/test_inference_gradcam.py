"""Grad-CAM on tiny Keras CNNs: a valid PNG, a map that points where the evidence is, layers inside the
functional graph (as networks.build_model makes them) and a clear error for nested ones."""

from __future__ import annotations

import io

import keras
import numpy as np
import pytest
from PIL import Image

from hema_pipeline.inference.gradcam import GradCam, gradcam_object_key, overlay_heatmap
from hema_pipeline.inference.predict import CellClassifier, prepare_images
from hema_pipeline.modeling.contract import ModelContract
from hema_pipeline_tests.support import model_contract

SIZE = 32


def dark_spot_png(width: int = 64, height: int = 60) -> bytes:
    """A light field with a dark disk in the upper-left quadrant."""
    rows, columns = np.mgrid[0:height, 0:width]
    image = np.full((height, width, 3), 230, np.uint8)
    image[(rows - 15) ** 2 + (columns - 16) ** 2 < 10**2] = (40, 30, 60)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def darkness_model() -> keras.Model:
    """last_conv channel 0 = darkness, channel 1 = brightness of each pixel; class 'dark' is the mean
    darkness. Grad-CAM for 'dark' must therefore light up the dark disk and nothing else."""
    inputs = keras.Input((SIZE, SIZE, 3))
    conv = keras.layers.Conv2D(2, 1, activation="relu", name="last_conv")
    pooled = keras.layers.GlobalAveragePooling2D()(conv(inputs))
    dense = keras.layers.Dense(2, name="logits")
    model = keras.Model(inputs, dense(pooled))
    third = 1.0 / (3 * 255.0)
    # darkness = relu(0.5 - brightness): zero on the light field, so the background gets no heat at all
    conv.set_weights([np.array([[[[-third, third]] * 3]], np.float32).reshape(1, 1, 3, 2), np.array([0.5, 0.0], np.float32)])
    dense.set_weights([np.eye(2, dtype=np.float32) * 4.0, np.zeros(2, np.float32)])
    return model


def card(classes: tuple[str, ...] = ("dark", "light"), layer: str = "last_conv", size: int = SIZE) -> ModelContract:
    return model_contract("t", "t-v1", classes, size, 1.0, {name: 0.0 for name in classes}, None, layer)


def test_gradcam_png_is_valid_and_points_at_the_evidence():
    classifier = CellClassifier(darkness_model(), card())
    gradcam = GradCam(classifier)
    image = dark_spot_png()

    maps = gradcam.maps(prepare_images([image], SIZE), class_indices=[0])
    heatmap = maps.heatmaps[0]
    assert heatmap.shape == (SIZE, SIZE)
    assert heatmap.max() == pytest.approx(1.0) and heatmap.min() >= 0.0
    assert heatmap.std() > 0.1  # not a uniform map
    spot = heatmap[4:11, 5:11].mean()  # the disk, at model resolution
    background = heatmap[20:, 20:].mean()
    assert spot > 0.8
    assert background < 0.05

    png = gradcam.png(image, class_name="dark")
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(png)) as decoded:
        assert decoded.format == "PNG" and decoded.size == (64, 60) and decoded.mode == "RGB"
        overlay = np.asarray(decoded)
    original = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
    # Coloured where the model looked, untouched where it did not.
    assert np.abs(overlay[15, 16].astype(int) - original[15, 16]).sum() > 60
    assert np.array_equal(overlay[55, 60], original[55, 60])


def test_with_a_cropping_card_the_map_covers_the_crop_it_was_computed_on():
    import dataclasses

    # The dark disk sits in the centre: with crop 0.5 the model sees a 30x30 centre of the 64x60 image.
    rows, columns = np.mgrid[0:60, 0:64]
    image = np.full((60, 64, 3), 230, np.uint8)
    image[(rows - 30) ** 2 + (columns - 32) ** 2 < 6**2] = (40, 30, 60)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    classifier = CellClassifier(darkness_model(), dataclasses.replace(card(), crop_fraction=0.5))
    heatmap = GradCam(classifier).maps(prepare_images([buffer.getvalue()], SIZE, 0.5), class_indices=[0]).heatmaps[0]
    assert heatmap[12:20, 12:20].mean() > 0.8  # the disk fills the middle of what the model saw
    with Image.open(io.BytesIO(GradCam(classifier).png(buffer.getvalue(), class_name="dark"))) as decoded:
        overlay = np.asarray(decoded)
    assert overlay.shape == image.shape
    assert np.abs(overlay[30, 32].astype(int) - image[30, 32]).sum() > 60  # heat on the disk
    outside = np.ones((60, 64), bool)
    outside[15:45, 17:47] = False  # the centred 30x30 square the network saw
    assert np.array_equal(overlay[outside], image[outside])


def test_gradcam_defaults_to_the_predicted_class():
    classifier = CellClassifier(darkness_model(), card())
    maps = GradCam(classifier).maps(prepare_images([dark_spot_png()], SIZE))
    # The field is mostly light, so the model predicts 'light' and explains that.
    assert maps.class_indices.tolist() == [int(np.argmax(maps.logits[0]))] == [1]


def test_gradcam_on_a_project_network_with_its_last_conv_in_the_functional_graph():
    from hema_pipeline.modeling.networks import LAST_CONV_LAYER, build_model, compact

    keras.utils.set_random_seed(3)
    model = build_model(compact(SIZE), 3)
    classifier = CellClassifier(model, card(("a", "b", "c"), LAST_CONV_LAYER))
    gradcam = GradCam(classifier)
    maps = gradcam.maps(prepare_images([dark_spot_png(), dark_spot_png(48, 48)], SIZE))
    assert maps.heatmaps.shape == (2, 4, 4)  # 32 px after three 2x poolings
    assert np.isfinite(maps.heatmaps).all() and (maps.heatmaps >= 0).all() and (maps.heatmaps <= 1).all()
    with Image.open(io.BytesIO(gradcam.png(dark_spot_png()))) as decoded:
        assert decoded.size == (64, 60)


def test_gradcam_of_an_ensemble_explains_the_mean_score():
    from dataclasses import replace

    from hema_pipeline.modeling.networks import LAST_CONV_LAYER, build_model, combine_members, compact

    keras.utils.set_random_seed(5)
    member = build_model(compact(SIZE), 3)
    images = prepare_images([dark_spot_png(), dark_spot_png(48, 48)], SIZE)
    alone = GradCam(CellClassifier(member, card(("a", "b", "c"), LAST_CONV_LAYER))).maps(images, class_indices=[0, 2])
    # Two copies of one network: the ensemble's score is the member's, so its map must be the member's.
    twins = combine_members(replace(compact(SIZE), ensemble_members=2), [member, member])
    together = GradCam(CellClassifier(twins, card(("a", "b", "c"), LAST_CONV_LAYER))).maps(images, class_indices=[0, 2])
    np.testing.assert_allclose(together.logits, alone.logits, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(together.heatmaps, alone.heatmaps, atol=1e-4)
    assert alone.heatmaps.std() > 0  # a map with something in it


def test_a_layer_inside_a_nested_model_is_refused_with_the_reason():
    inner_input = keras.Input((SIZE, SIZE, 3))
    inner = keras.Model(inner_input, keras.layers.Conv2D(4, 3, name="inner_conv")(inner_input), name="backbone")
    outer_input = keras.Input((SIZE, SIZE, 3))
    features = keras.layers.GlobalAveragePooling2D()(inner(outer_input))
    outer = keras.Model(outer_input, keras.layers.Dense(2, name="logits")(features))
    classifier = CellClassifier(outer, card(layer="inner_conv"))
    with pytest.raises(ValueError, match="nested model.*backbone"):
        GradCam(classifier)
    with pytest.raises(ValueError, match="no layer 'absent'"):
        GradCam(classifier, "absent")


def test_overlay_and_object_key():
    image = np.full((10, 12, 3), 100, np.uint8)
    cold = overlay_heatmap(image, np.zeros((3, 3), np.float32))
    assert np.array_equal(cold, image)
    hot = overlay_heatmap(image, np.ones((3, 3), np.float32), opacity=1.0)
    assert hot.shape == image.shape and not np.array_equal(hot, image)
    assert (
        gradcam_object_key("pbc-0123456789ab", "S0123456789abcdef0123:42")
        == "gradcam/pbc-0123456789ab/S0123456789abcdef0123/42.png"
    )
    with pytest.raises(ValueError):
        gradcam_object_key("v1", "no-cell-number")
