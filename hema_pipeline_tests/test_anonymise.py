"""Pseudonyms, age bands, key handling and lossless metadata stripping."""

from __future__ import annotations

import datetime as dt
import io

import numpy as np
import pytest
from PIL import Image

from hema_pipeline.anonymise.images import ImageRejected, clean_cell_image
from hema_pipeline.anonymise.pseudonymise import (
    MissingPseudonymKey,
    PseudonymKey,
    age_band,
    load_pseudonym_key,
)


def test_pseudonyms_are_keyed_stable_and_namespaced():
    key = PseudonymKey(b"k" * 32)
    other = PseudonymKey(b"j" * 32)
    assert key.patient_id("MRN00001234") == key.patient_id(" MRN00001234 ")
    assert key.patient_id("MRN00001234") != other.patient_id("MRN00001234")
    assert key.patient_id("X1")[1:] != key.smear_id("X1")[1:]
    assert "1234" not in key.patient_id("MRN00001234")


@pytest.mark.parametrize(
    ("birth", "on", "band"),
    [
        (dt.date(1980, 6, 1), dt.date(2026, 5, 31), "40-49"),
        (dt.date(1980, 6, 1), dt.date(2026, 6, 1), "40-49"),
        (dt.date(1976, 6, 2), dt.date(2026, 6, 1), "40-49"),
        (dt.date(1976, 6, 1), dt.date(2026, 6, 1), "50-59"),
        (dt.date(2026, 1, 1), dt.date(2026, 3, 1), "00-09"),
        (dt.date(1930, 1, 1), dt.date(2026, 3, 1), "90+"),
    ],
)
def test_age_band(birth, on, band):
    assert age_band(birth, on) == band


def test_key_is_required_outside_demo_mode(tmp_path):
    with pytest.raises(MissingPseudonymKey, match="HEMA_PSEUDONYM_KEY"):
        load_pseudonym_key(None, None, demo_mode=False)
    with pytest.raises(MissingPseudonymKey):
        load_pseudonym_key(None, str(tmp_path / "absent.key"), demo_mode=False)
    with pytest.raises(MissingPseudonymKey, match="at least 32 bytes"):
        load_pseudonym_key("short", None, demo_mode=False)
    with pytest.raises(MissingPseudonymKey, match="odd number"):  # a mistyped hex key is never a text key
        load_pseudonym_key("5e" * 31 + "5", None, demo_mode=False)


def test_demo_mode_creates_a_private_key_file_once(tmp_path):
    path = tmp_path / "keys" / "pseudonym.key"
    first = load_pseudonym_key(None, str(path), demo_mode=True)
    second = load_pseudonym_key(None, str(path), demo_mode=True)
    assert first == second
    assert path.stat().st_mode & 0o777 == 0o600


def _jpeg_with_metadata(progressive: bool = False) -> tuple[bytes, np.ndarray]:
    pixels = (np.random.default_rng(0).random((363, 360, 3)) * 255).astype("uint8")
    exif = Image.Exif()
    exif[0x010E] = "DOE^JANE MRN99887766"
    exif[0x013B] = "Analyser operator"
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", exif=exif.tobytes(), comment=b"ACC-2026-42", progressive=progressive, quality=90)
    return buffer.getvalue() + b"trailing DOE^JANE", pixels


@pytest.mark.parametrize("progressive", [False, True])
def test_strip_removes_every_text_segment_and_keeps_pixels_bit_exact(progressive):
    original, _ = _jpeg_with_metadata(progressive)
    clean = clean_cell_image(original)
    for secret in (b"DOE^JANE", b"MRN99887766", b"ACC-2026-42", b"operator"):
        assert secret in original and secret not in clean.jpeg
    decoded_original = np.asarray(Image.open(io.BytesIO(original)))
    decoded_clean = np.asarray(Image.open(io.BytesIO(clean.jpeg)))
    assert np.array_equal(decoded_original, decoded_clean)
    assert (clean.width, clean.height) == (360, 363)


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", "not_an_image"),
        (b"GIF89a not a jpeg", "not_an_image"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "corrupt_image"),
    ],
)
def test_rejects_non_jpegs_and_broken_structure(data, code):
    with pytest.raises(ImageRejected) as rejected:
        clean_cell_image(data)
    assert rejected.value.code == code


def test_rejects_truncated_jpeg_at_every_cut():
    original, _ = _jpeg_with_metadata()
    for cut in (100, 400, len(original) // 2, len(original) - 40):
        with pytest.raises(ImageRejected) as rejected:
            clean_cell_image(original[:cut])
        assert rejected.value.code == "corrupt_image"


def test_rejects_png_even_when_named_jpeg():
    buffer = io.BytesIO()
    Image.new("RGB", (10, 10)).save(buffer, "PNG")
    with pytest.raises(ImageRejected) as rejected:
        clean_cell_image(buffer.getvalue())
    assert rejected.value.code == "not_an_image"
