"""Hostile JPEGs against the cell-image sanitiser: every place a writer can hide text, truncated and
inconsistent files, size limits, and `hema classify`'s pixel limit.

Each hostile file is built from a Pillow JPEG by byte surgery on its list of segments (``_walk`` and
``_build`` are an independent, deliberately simple marker walker). An accepted file must not contain
the planted text and must decode to exactly the original's pixels; a refused one must carry the code.
"""

from __future__ import annotations

import io
import struct
import time
import warnings
import zlib
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image, ImageFile

from hema_pipeline import settings
from hema_pipeline.anonymise.images import (
    DEFAULT_MAX_PIXELS,
    REASON_CODES,
    ImageRejected,
    clean_cell_image,
)

SECRET = b"DOE^JANE MRN99887766"
SOI, EOI, SOS, COM, DNL = 0xD8, 0xD9, 0xDA, 0xFE, 0xDC
DATA = -1  # the entropy-coded data after a scan header, RSTn markers included
# What a rebuilt file may contain: SOI, JFIF APP0, Adobe APP14, DQT, DHT, DRI, SOF0-2, SOS, RSTn, EOI.
ALLOWED_MARKERS = {0xD8, 0xE0, 0xEE, 0xDB, 0xC4, 0xDD, 0xC0, 0xC1, 0xC2, 0xDA, *range(0xD0, 0xD8), 0xD9}

Items = list[tuple[int, bytes]]


# ---------------------------------------------------------------------------------------------------
# Building hostile files


def _walk(jpeg: bytes) -> Items:
    """(marker, payload) of every segment up to EOI, with (DATA, bytes) after each scan header."""
    assert jpeg[:2] == b"\xff\xd8"
    items: Items = []
    position = 2
    while True:
        assert jpeg[position] == 0xFF, "not at a marker"
        marker = jpeg[position + 1]
        if marker == 0xFF:
            position += 1
            continue
        if marker == EOI:
            items.append((EOI, b""))
            return items
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            items.append((marker, b""))
            position += 2
            continue
        (length,) = struct.unpack(">H", jpeg[position + 2 : position + 4])
        items.append((marker, jpeg[position + 4 : position + 2 + length]))
        position += 2 + length
        if marker == SOS:
            end = position
            while True:
                end = jpeg.index(b"\xff", end)
                if jpeg[end + 1] == 0x00 or 0xD0 <= jpeg[end + 1] <= 0xD7:
                    end += 2
                    continue
                break
            items.append((DATA, jpeg[position:end]))
            position = end


def _build(items: Items) -> bytes:
    out = bytearray(b"\xff\xd8")
    for marker, payload in items:
        if marker == DATA:
            out += payload
        elif marker in (EOI, 0x01) or 0xD0 <= marker <= 0xD7:
            out += bytes((0xFF, marker))
        else:
            out += bytes((0xFF, marker)) + struct.pack(">H", len(payload) + 2) + payload
    return bytes(out)


def _first(items: Items, marker: int, nth: int = 0) -> int:
    return [index for index, (found, _) in enumerate(items) if found == marker][nth]


def _insert_before(jpeg: bytes, marker: int, *new: tuple[int, bytes], nth: int = 0) -> bytes:
    items = _walk(jpeg)
    index = _first(items, marker, nth)
    return _build(items[:index] + list(new) + items[index:])


def _replace(jpeg: bytes, marker: int, payload: bytes, new_marker: int | None = None) -> bytes:
    items = _walk(jpeg)
    index = _first(items, marker)
    items[index] = (marker if new_marker is None else new_marker, payload)
    return _build(items)


def _pixels(size: tuple[int, int] = (64, 48), seed: int = 0) -> np.ndarray:
    """A cell-like picture: smooth shapes and some noise (so every coefficient kind occurs)."""
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(seed).normal(0, 12, (height, width, 3))
    base = np.stack([128 + 90 * np.sin(x / 7.0), 128 + 80 * np.cos(y / 5.0), (x * 3 + y * 2) % 256], axis=-1)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _jpeg(size: tuple[int, int] = (64, 48), mode: str = "RGB", **options: object) -> bytes:
    image = Image.fromarray(_pixels(size))
    if mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **{"quality": 90, **options})
    return buffer.getvalue()


def _decode(jpeg: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(jpeg)) as image:
        return np.asarray(image)


def _assert_clean(hostile: bytes, expected: np.ndarray) -> bytes:
    clean = clean_cell_image(hostile)
    assert SECRET not in clean.jpeg
    assert np.array_equal(_decode(clean.jpeg), expected)
    assert (clean.height, clean.width) == expected.shape[:2]
    _assert_only_allowed_markers(clean.jpeg)
    return clean.jpeg


def _assert_only_allowed_markers(jpeg: bytes) -> None:
    for marker, payload in _walk(jpeg):
        if marker == DATA:
            continue
        assert marker in ALLOWED_MARKERS, hex(marker)
        if marker == 0xE0:
            assert len(payload) == 14 and payload[:5] == b"JFIF\x00" and payload[12:] == b"\x00\x00"
        if marker == 0xEE:
            assert len(payload) == 12 and payload[:11] == b"Adobe\x00\x64\x00\x00\x00\x00"


def _assert_rejected(data: bytes, code: str, **options: int) -> ImageRejected:
    with pytest.raises(ImageRejected) as rejected:
        clean_cell_image(data, **options)
    assert rejected.value.code == code, rejected.value.reason
    assert rejected.value.code in REASON_CODES
    assert SECRET not in rejected.value.reason.encode() and b"DOE" not in rejected.value.reason.encode()
    return rejected.value


# ---------------------------------------------------------------------------------------------------
# Metadata hiding places: dropped, pixels kept


def _jfif_with_extra_bytes(jpeg: bytes) -> bytes:
    items = _walk(jpeg)
    jfif = items[_first(items, 0xE0)][1]
    return _replace(jpeg, 0xE0, jfif[:14] + SECRET)


def _jfif_with_thumbnail(jpeg: bytes) -> bytes:
    items = _walk(jpeg)
    jfif = items[_first(items, 0xE0)][1]
    thumbnail = SECRET + b" " * (-len(SECRET) % 3)
    return _replace(jpeg, 0xE0, jfif[:12] + bytes((len(thumbnail) // 3, 1)) + thumbnail)


def _jfxx_thumbnail_with_comment(jpeg: bytes) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buffer, "JPEG", comment=SECRET)
    return _insert_before(jpeg, 0xDB, (0xE0, b"JFXX\x00\x10" + buffer.getvalue()))


def _adobe_with_trailing_bytes(jpeg: bytes) -> bytes:
    # transform 1 (YCbCr) is what the JFIF header already implies: the pixels stay the same
    return _insert_before(jpeg, 0xDB, (0xEE, b"Adobe\x00\x64\x00\x00\x00\x00\x01" + SECRET))


def _com_between_dht_and_sos(jpeg: bytes) -> bytes:
    return _insert_before(jpeg, SOS, (COM, SECRET))


def _dnl_after_scan(jpeg: bytes) -> bytes:
    return _insert_before(jpeg, EOI, (DNL, struct.pack(">H", 48)), (DNL, SECRET))


def _reserved_markers(jpeg: bytes) -> bytes:
    return _insert_before(jpeg, 0xC4, (0xF0, SECRET), (0xFD, SECRET), (0x02, SECRET), (0xBF, SECRET))


def _trailing_data(jpeg: bytes) -> bytes:
    return jpeg + SECRET + _jpeg((8, 8), comment=SECRET)


def _fill_and_stray_markers(jpeg: bytes) -> bytes:
    items = _walk(jpeg)
    index = _first(items, 0xC4)
    # 0xFF fill before markers, a TEM and a stray RST between segments: legal, they carry nothing
    items[index:index] = [(0x01, b""), (0xD3, b"")]
    return _build(items).replace(b"\xff\xc4", b"\xff\xff\xff\xff\xc4", 1) + b"\xff\xff" + SECRET


def _every_app_segment(jpeg: bytes) -> bytes:
    segments = [(0xE0 + n, b"APP " + SECRET) for n in range(16)]
    return _insert_before(jpeg, 0xDB, *segments)


def _app_between_scans(jpeg: bytes) -> bytes:
    return _insert_before(jpeg, SOS, (COM, SECRET), (0xE1, b"Exif\x00\x00" + SECRET), (COM, SECRET), nth=1)


HIDING_PLACES: dict[str, Callable[[bytes], bytes]] = {
    "app0_jfif_extra_bytes": _jfif_with_extra_bytes,
    "app0_jfif_thumbnail": _jfif_with_thumbnail,
    "app0_jfxx_thumbnail_with_its_own_com": _jfxx_thumbnail_with_comment,
    "app14_adobe_trailing_bytes": _adobe_with_trailing_bytes,
    "com_between_dht_and_sos": _com_between_dht_and_sos,
    "dnl_after_scan": _dnl_after_scan,
    "reserved_and_jpgn_markers": _reserved_markers,
    "trailing_data_and_second_image": _trailing_data,
    "fill_tem_stray_rst": _fill_and_stray_markers,
    "app0_to_app15": _every_app_segment,
}


@pytest.mark.parametrize("hide", list(HIDING_PLACES.values()), ids=list(HIDING_PLACES))
@pytest.mark.parametrize("progressive", [False, True], ids=["baseline", "progressive"])
def test_metadata_hiding_places_are_dropped_and_pixels_kept(hide, progressive):
    original = _jpeg(progressive=progressive)
    hostile = hide(original)
    assert SECRET in hostile
    _assert_clean(hostile, _decode(original))


def test_progressive_scans_with_segments_between_them():
    original = _jpeg(progressive=True)
    items = _walk(original)
    scans = [index for index, (marker, _) in enumerate(items) if marker == SOS]
    assert len(scans) >= 6
    for index in reversed(scans[1:]):
        items[index:index] = [(COM, SECRET), (0xE2, SECRET)]
    _assert_clean(_build(items), _decode(original))


def test_app14_transform_is_kept_because_it_changes_the_colours():
    """An Adobe segment saying RGB (transform 0) changes how libjpeg reads a 3-component image."""
    original = _insert_before(_jpeg(), 0xDB, (0xEE, b"Adobe\x00\x64\x80\x00\x00\x00\x00" + SECRET))
    original = _replace(original, 0xE0, b"NOTJFIF" + SECRET)  # without JFIF, Adobe decides
    expected = _decode(original)
    assert not np.array_equal(expected, _decode(_jpeg()))
    rebuilt = _assert_clean(original, expected)
    assert b"JFIF" not in rebuilt and rebuilt.count(b"Adobe") == 1


def test_cmyk_with_adobe_keeps_its_pixels():
    original = _jpeg(mode="CMYK")
    assert b"Adobe" in original
    _assert_clean(_insert_before(original, 0xDB, (COM, SECRET)), _decode(original))


# ---------------------------------------------------------------------------------------------------
# Data the decoder never reads: refused


def _junk_before_eoi(jpeg: bytes) -> bytes:
    return _insert_before(jpeg, EOI, (DATA, SECRET))


def _stuffed_bytes_before_eoi(jpeg: bytes) -> bytes:
    return _insert_before(jpeg, EOI, (DATA, b"\xff\x00" * 4))


def _junk_after_first_scan(jpeg: bytes) -> bytes:
    items = _walk(jpeg)
    index = _first(items, DATA)
    items[index] = (DATA, items[index][1] + SECRET)
    return _build(items)


def _junk_before_a_restart_marker(jpeg: bytes) -> bytes:
    items = _walk(jpeg)
    index = _first(items, DATA)
    data = items[index][1]
    first_rst = next(i for i in range(len(data) - 1) if data[i] == 0xFF and 0xD0 <= data[i + 1] <= 0xD7)
    items[index] = (DATA, data[:first_rst] + SECRET + data[first_rst:])
    return _build(items)


def _frame_shorter_than_its_data(jpeg: bytes) -> bytes:
    items = _walk(jpeg)
    index = _first(items, 0xC0)
    sof = bytearray(items[index][1])
    sof[1:3] = struct.pack(">H", 16)  # 48 rows of data, 16 declared
    items[index] = (0xC0, bytes(sof))
    return _build(items)


@pytest.mark.parametrize(
    ("make", "options"),
    [
        (_junk_before_eoi, {}),
        (_junk_before_eoi, {"progressive": True}),
        (_stuffed_bytes_before_eoi, {}),
        (_junk_after_first_scan, {"progressive": True}),
        (_junk_before_a_restart_marker, {"restart_marker_blocks": 3}),
        (_frame_shorter_than_its_data, {}),
    ],
    ids=["baseline", "progressive_last_scan", "stuffed_ff00", "progressive_first_scan", "before_rst", "short_frame"],
)
def test_bytes_after_the_last_mcu_are_refused(make, options):
    _assert_rejected(make(_jpeg(**options)), "corrupt_image")


def _interval_ends(data: bytes) -> list[int]:
    """Where each restart interval of a scan's data ends (at its RSTn, or the end of the data)."""
    rst = [i for i in range(len(data) - 1) if data[i] == 0xFF and 0xD0 <= data[i + 1] <= 0xD7]
    return rst + [len(data)]


@pytest.mark.parametrize("count", [1, 3, 7])
@pytest.mark.parametrize(
    "options",
    [{}, {"progressive": True}, {"restart_marker_blocks": 1}, {"restart_marker_blocks": 2, "progressive": True}],
    ids=["baseline", "progressive", "restarts", "progressive_restarts"],
)
def test_a_few_bytes_after_the_last_mcu_of_any_interval_are_refused(options, count):
    """libjpeg reads up to 7 bytes ahead into its bit buffer and warns only about junk it skipped after
    that, so a strict decode alone lets a few bytes pass at the end of a scan or before an RSTn."""
    import simplejpeg

    items = _walk(_jpeg(**options))
    hostile_files = []
    for index in [i for i, (marker, _) in enumerate(items) if marker == DATA]:
        data = items[index][1]
        ends = _interval_ends(data)
        for end in sorted(set(ends[:3] + ends[-2:])):
            junk = data[:end] + b"\x5a" * count + data[end:]
            hostile_files.append(_build(items[:index] + [(DATA, junk)] + items[index + 1 :]))
    missed_by_libjpeg = 0
    for hostile in hostile_files:
        _assert_rejected(hostile, "corrupt_image")
        try:
            simplejpeg.decode_jpeg(hostile, colorspace="RGB", strict=True)
            missed_by_libjpeg += 1
        except ValueError:
            pass
    assert missed_by_libjpeg or count == 7  # the case this guards against does occur


def _handmade_grey_jpeg(scan_bits: str) -> bytes:
    """An 8 x 8 greyscale baseline JPEG with tiny Huffman tables (DC: '0' = category 0; AC: '0' = ZRL,
    '10' = end-of-block, '110' = run 15 then a 1-bit value) and one block coded as ``scan_bits``."""
    dqt = (0xDB, b"\x00" + bytes([255] * 64))
    sof = (0xC0, struct.pack(">BHHB", 8, 8, 8, 1) + b"\x01\x11\x00")
    dc = (0xC4, b"\x00" + bytes([1] + [0] * 15) + b"\x00")
    ac = (0xC4, b"\x10" + bytes([1, 1, 1] + [0] * 13) + b"\xf0\x00\xf1")
    sos = (SOS, b"\x01\x01\x00\x00\x3f\x00")
    bits = scan_bits + "1" * (-len(scan_bits) % 8)
    return _build([dqt, sof, dc, ac, sos, (DATA, int(bits, 2).to_bytes(len(bits) // 8, "big")), (EOI, b"")])


def test_a_zero_run_past_the_end_of_a_block_is_decoded_as_libjpeg_does():
    """Known limit (no entropy decode here): three ZRLs and a run of 15 put a coefficient at index 64.
    libjpeg clamps it to the block's last coefficient without a warning; the file is accepted and
    decodes to the same pixels as its original."""
    plain = _handmade_grey_jpeg("0" + "10")  # DC 0, end-of-block: flat grey
    assert np.all(_decode(plain) == 128)
    _assert_clean(plain, _decode(plain))
    overflowing = _handmade_grey_jpeg("0" + "000" + "110" + "1")
    expected = _decode(overflowing)
    assert not np.all(expected == 128)  # the clamped coefficient shows
    _assert_clean(overflowing, expected)


# ---------------------------------------------------------------------------------------------------
# Truncated and inconsistent files: refused


def _cut_scan(jpeg: bytes, fraction: float, scan: int = -1) -> bytes:
    """The scan's data cut at ``fraction`` of its length and the file ended there with EOI."""
    items = _walk(jpeg)
    index = [i for i, (marker, _) in enumerate(items) if marker == DATA][scan]
    data = items[index][1][: int(len(items[index][1]) * fraction)].rstrip(b"\xff")
    if data[-2:-1] == b"\xff":
        data = data[:-2]
    return _build(items[:index] + [(DATA, data), (EOI, b"")])


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("progressive", [False, True], ids=["baseline", "progressive"])
def test_truncated_scan_followed_by_eoi_is_refused(fraction, progressive):
    truncated = _cut_scan(_jpeg((360, 363), progressive=progressive), fraction)
    # Pillow alone takes this for a good image: libjpeg only warns and fills the rest grey.
    with Image.open(io.BytesIO(truncated)) as image:
        image.load()
    _assert_rejected(truncated, "corrupt_image")


def test_truncated_first_progressive_scan_and_missing_scans_are_refused():
    original = _jpeg((360, 363), progressive=True)
    _assert_rejected(_cut_scan(original, 0.5, scan=0), "corrupt_image")
    items = _walk(original)
    last_scan = _first(items, SOS, nth=-1)
    missing_last_scan = _build(items[:last_scan] + [(EOI, b"")])
    with Image.open(io.BytesIO(missing_last_scan)) as image:
        image.load()  # a blurred image to Pillow
    assert "missing scans" in _assert_rejected(missing_last_scan, "corrupt_image").reason


def _frame_size(jpeg: bytes, width: int, height: int) -> bytes:
    items = _walk(jpeg)
    index = next(i for i, (marker, _) in enumerate(items) if marker in (0xC0, 0xC1, 0xC2))
    sof = bytearray(items[index][1])
    sof[1:5] = struct.pack(">HH", height, width)
    items[index] = (items[index][0], bytes(sof))
    return _build(items)


def test_frame_header_larger_than_its_data_is_refused():
    small = _jpeg((48, 40))
    huge = _frame_size(small, 12000, 12000)
    _assert_rejected(huge, "image_too_large")
    started = time.monotonic()
    assert "ends before" in _assert_rejected(huge, "corrupt_image", max_pixels=200_000_000).reason
    assert time.monotonic() - started < 5
    _assert_rejected(_frame_size(small, 48, 80), "corrupt_image")
    _assert_rejected(_frame_size(small, 56, 40), "corrupt_image")
    _assert_rejected(_frame_size(_jpeg((48, 40), progressive=True), 48, 56), "corrupt_image")


def test_decompression_bomb_is_too_large_not_an_exception():
    bomb = _frame_size(_jpeg((48, 40)), 40000, 40000)
    started = time.monotonic()
    _assert_rejected(bomb, "image_too_large")
    assert time.monotonic() - started < 1
    # Even with the limit lifted, no DecompressionBombError escapes: the data is too short.
    _assert_rejected(bomb, "corrupt_image", max_pixels=2_000_000_000)


def test_pillow_decompression_bomb_guard_maps_to_too_large(monkeypatch):
    jpeg = _jpeg((48, 40))
    for limit in (1000, 500):  # 1,920 pixels: a warning above 1000, an error above 2 x 500
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _assert_rejected(jpeg, "image_too_large")


def test_pixel_limit_is_checked_before_decoding():
    cell = _jpeg((360, 363))
    assert DEFAULT_MAX_PIXELS >= 4 * 360 * 363
    assert clean_cell_image(cell, max_pixels=360 * 363).width == 360
    reason = _assert_rejected(cell, "image_too_large", max_pixels=360 * 363 - 1).reason
    assert "363" not in reason and "360" not in reason  # the file's values are not echoed


def test_max_image_pixels_setting(monkeypatch):
    monkeypatch.delenv("HEMA_MAX_IMAGE_PIXELS", raising=False)
    assert settings.max_image_pixels() == DEFAULT_MAX_PIXELS
    monkeypatch.setenv("HEMA_MAX_IMAGE_PIXELS", "250000")
    assert settings.max_image_pixels() == 250_000


def _with_sof(jpeg: bytes, marker: int, precision: int = 8) -> bytes:
    items = _walk(jpeg)
    index = _first(items, 0xC0)
    items[index] = (marker, bytes((precision,)) + items[index][1][1:])
    return _build(items)


@pytest.mark.parametrize(
    "make",
    [
        lambda jpeg: _with_sof(jpeg, 0xC9),  # arithmetic
        lambda jpeg: _with_sof(jpeg, 0xCA),  # arithmetic progressive
        lambda jpeg: _with_sof(jpeg, 0xC3),  # lossless
        lambda jpeg: _with_sof(jpeg, 0xC5),  # hierarchical
        lambda jpeg: _with_sof(jpeg, 0xC1, precision=12),
        lambda jpeg: _insert_before(jpeg, SOS, (0xCC, b"\x00\x10")),  # arithmetic conditioning (DAC)
        lambda jpeg: _frame_size(jpeg, 64, 0),  # height from DNL
    ],
    ids=["sof9", "sof10", "sof3", "sof5", "12_bit", "dac", "dnl_height"],
)
def test_unsupported_codings_are_refused(make):
    _assert_rejected(make(_jpeg()), "unsupported_jpeg")


def _segment_payload(jpeg: bytes, marker: int, change: Callable[[bytes], bytes]) -> bytes:
    items = _walk(jpeg)
    index = _first(items, marker)
    items[index] = (marker, change(items[index][1]))
    return _build(items)


def _restart_markers_renumbered(jpeg: bytes) -> bytes:
    items = _walk(jpeg)
    index = _first(items, DATA)
    items[index] = (DATA, items[index][1].replace(b"\xff\xd1", b"\xff\xd2", 1))
    return _build(items)


def _restart_marker_removed(jpeg: bytes) -> bytes:
    items = _walk(jpeg)
    index = _first(items, DATA)
    items[index] = (DATA, items[index][1].replace(b"\xff\xd1", b"", 1))
    return _build(items)


def _extra_restart_interval(jpeg: bytes) -> bytes:
    return _insert_before(jpeg, EOI, (0xD5, b""), (DATA, b"\x12\x34"))


STRUCTURE_ERRORS: dict[str, tuple[Callable[[bytes], bytes], dict[str, object]]] = {
    "junk_between_segments": (lambda jpeg: _insert_before(jpeg, 0xC4, (DATA, SECRET)), {}),
    "junk_between_scans": (lambda jpeg: _insert_before(jpeg, SOS, (DATA, b"\xff" + SECRET), nth=1), {"progressive": True}),
    "second_soi": (lambda jpeg: _insert_before(jpeg, 0xC4, (SOI, b"")), {}),
    "dqt_longer_than_tables": (lambda jpeg: _segment_payload(jpeg, 0xDB, lambda p: p + b"\x01"), {}),
    "dqt_shorter_than_tables": (lambda jpeg: _segment_payload(jpeg, 0xDB, lambda p: p[:-1]), {}),
    "dqt_table_id_out_of_range": (lambda jpeg: _segment_payload(jpeg, 0xDB, lambda p: b"\x04" + p[1:]), {}),
    "dht_longer_than_tables": (lambda jpeg: _segment_payload(jpeg, 0xC4, lambda p: p + SECRET), {}),
    "dht_counts_exceed_symbols": (lambda jpeg: _segment_payload(jpeg, 0xC4, lambda p: p[:16] + b"\xff" + p[17:]), {}),
    "sof_component_count_mismatch": (lambda jpeg: _segment_payload(jpeg, 0xC0, lambda p: p[:5] + b"\x04" + p[6:]), {}),
    "sof_trailing_bytes": (lambda jpeg: _segment_payload(jpeg, 0xC0, lambda p: p + SECRET), {}),
    "sos_component_count_mismatch": (lambda jpeg: _segment_payload(jpeg, SOS, lambda p: b"\x02" + p[1:]), {}),
    "sos_trailing_bytes": (lambda jpeg: _segment_payload(jpeg, SOS, lambda p: p + SECRET), {}),
    "sos_unknown_component": (lambda jpeg: _segment_payload(jpeg, SOS, lambda p: p[:1] + b"\x09" + p[2:]), {}),
    "sos_undefined_huffman_table": (lambda jpeg: _segment_payload(jpeg, SOS, lambda p: p[:2] + b"\x33" + p[3:]), {}),
    "sequential_scan_with_progressive_parameters": (
        lambda jpeg: _segment_payload(jpeg, SOS, lambda p: p[:-3] + b"\x00\x3f\x01"),
        {},
    ),
    "dri_wrong_length": (lambda jpeg: _insert_before(jpeg, SOS, (0xDD, b"\x00\x04" + SECRET)), {}),
    "restart_markers_out_of_order": (_restart_markers_renumbered, {"restart_marker_blocks": 2}),
    "restart_marker_missing": (_restart_marker_removed, {"restart_marker_blocks": 2}),
    "extra_restart_interval": (_extra_restart_interval, {"restart_marker_blocks": 2}),
    "scan_before_frame": (
        lambda jpeg: _build([item for item in _walk(jpeg) if item[0] != 0xC0][:-1] + [(EOI, b"")]),
        {},
    ),
    "two_frames": (lambda jpeg: _insert_before(jpeg, SOS, _walk(jpeg)[_first(_walk(jpeg), 0xC0)]), {}),
    "no_scan": (lambda jpeg: _build([item for item in _walk(jpeg) if item[0] not in (SOS, DATA)]), {}),
    "no_end_of_image": (lambda jpeg: jpeg[:-2], {}),
    "segment_length_past_the_end": (lambda jpeg: jpeg[:200] + b"\xff\xfe\xff\xff" + SECRET, {}),
}


def _invalid_huffman_code(jpeg: bytes) -> bytes:
    items = _walk(jpeg)
    index = _first(items, DATA)
    data = items[index][1]
    # All-ones is never a valid code in a libjpeg-built table: a run of stuffed 0xFF bytes mid-scan.
    items[index] = (DATA, data[:40] + b"\xff\x00" * 8 + data[56:])
    return _build(items)


STRUCTURE_ERRORS["invalid_huffman_code"] = (_invalid_huffman_code, {})


@pytest.mark.parametrize(("make", "options"), list(STRUCTURE_ERRORS.values()), ids=list(STRUCTURE_ERRORS))
def test_inconsistent_structure_is_refused(make, options):
    _assert_rejected(make(_jpeg(**options)), "corrupt_image")


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", "not_an_image"),
        (b"\x89PNG\r\n\x1a\n", "not_an_image"),
        (b"\xff\xd8", "corrupt_image"),
        (b"\xff\xd8\xff", "corrupt_image"),
        (b"\xff\xd8\xff\xd9", "corrupt_image"),
        (b"\xff\xd8\xff\xfe\x00\x01\xff\xd9", "corrupt_image"),
    ],
)
def test_tiny_files(data, code):
    _assert_rejected(data, code)


def test_every_cut_of_a_file_is_refused_and_never_leaks():
    original = _insert_before(_jpeg((24, 16), restart_marker_blocks=1), 0xC4, (COM, SECRET))
    for cut in range(len(original) - 2):  # at len - 2, adding EOI restores the file
        for tail in (b"", b"\xff\xd9"):
            try:
                clean = clean_cell_image(original[:cut] + tail)
            except ImageRejected as rejected:
                assert rejected.code in REASON_CODES
                continue
            raise AssertionError(f"cut at {cut} accepted ({len(clean.jpeg)} bytes)")


def test_random_byte_corruption_never_leaks_or_crashes():
    original = _insert_before(_jpeg((32, 24)), SOS, (COM, SECRET))
    rng = np.random.default_rng(7)
    for _ in range(400):
        corrupted = bytearray(original)
        for position in rng.integers(0, len(original), rng.integers(1, 4)):
            corrupted[position] = int(rng.integers(0, 256))
        try:
            clean = clean_cell_image(bytes(corrupted))
        except ImageRejected as rejected:
            assert rejected.code in REASON_CODES
            continue
        assert SECRET not in clean.jpeg
        _assert_only_allowed_markers(clean.jpeg)


# ---------------------------------------------------------------------------------------------------
# Whatever Pillow writes: rebuilt bit-exact from whitelisted segments only


def _exif() -> bytes:
    exif = Image.Exif()
    exif[0x010E] = SECRET.decode()
    exif[0x013B] = "Analyser operator"
    return exif.tobytes()


PILLOW_OPTIONS = [
    ("RGB", (360, 363), {"quality": 95, "subsampling": 0}),
    ("RGB", (360, 363), {"quality": 75, "subsampling": 2, "optimize": True, "comment": SECRET}),
    ("RGB", (360, 363), {"quality": 90, "progressive": True, "exif": _exif(), "icc_profile": b"\0" * 64 + SECRET}),
    ("RGB", (33, 17), {"quality": 50, "subsampling": 1, "dpi": (300, 300), "xmp": b"<x>" + SECRET + b"</x>"}),
    ("RGB", (64, 64), {"quality": 100, "progressive": True, "restart_marker_blocks": 2, "comment": SECRET}),
    ("RGB", (360, 363), {"quality": 85, "restart_marker_rows": 1, "exif": _exif(), "optimize": True}),
    ("RGB", (8, 8), {"quality": 30, "progressive": True, "optimize": True}),
    ("RGB", (1, 1), {"quality": 90}),
    ("L", (360, 363), {"quality": 90, "comment": SECRET, "icc_profile": b"\0" * 64 + SECRET}),
    ("L", (17, 9), {"quality": 70, "progressive": True, "restart_marker_blocks": 1}),
    ("CMYK", (40, 30), {"quality": 90, "icc_profile": b"\0" * 64 + SECRET}),
    ("CMYK", (40, 30), {"quality": 90, "progressive": True}),
]


@pytest.mark.parametrize(("mode", "size", "options"), PILLOW_OPTIONS)
def test_any_pillow_jpeg_is_rebuilt_bit_exact_from_allowed_segments(mode, size, options):
    original = _jpeg(size, mode, **options)
    clean = clean_cell_image(original)
    assert SECRET not in clean.jpeg and b"operator" not in clean.jpeg
    assert np.array_equal(_decode(clean.jpeg), _decode(original))
    with Image.open(io.BytesIO(clean.jpeg)) as image, Image.open(io.BytesIO(original)) as source:
        assert image.mode == source.mode and image.size == source.size == (clean.width, clean.height)
    _assert_only_allowed_markers(clean.jpeg)
    if "restart_marker_blocks" in options or "restart_marker_rows" in options:
        assert any(0xD0 <= marker <= 0xD7 for marker in _markers_in(clean.jpeg))
    assert clean_cell_image(clean.jpeg).jpeg == clean.jpeg  # rebuilding is idempotent


def _markers_in(jpeg: bytes) -> set[int]:
    return {jpeg[i + 1] for i in range(len(jpeg) - 1) if jpeg[i] == 0xFF and jpeg[i + 1] not in (0x00, 0xFF)}


def test_truncated_images_are_not_loaded_leniently():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.shared_data
def test_real_cell_images_pass_bit_exact():
    from hema_pipeline_tests.conftest import require_pbc

    files = sorted(require_pbc().glob("*/*.jpg"))
    assert files, "no JPEGs under pbc/"
    sample = files[:: max(1, len(files) // 50)][:50]
    for path in sample:
        data = path.read_bytes()
        clean = clean_cell_image(data)
        assert np.array_equal(_decode(clean.jpeg), _decode(data)), path.name
        _assert_only_allowed_markers(clean.jpeg)


# ---------------------------------------------------------------------------------------------------
# hema classify: refuses oversized files from their header


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")


def _png_bomb(side: int) -> bytes:
    """A valid grey PNG of side x side pixels, compressed to a few hundred KB."""
    compressor = zlib.compressobj(9)
    row = b"\0" * (side + 1)
    body = b"".join(compressor.compress(row * 500) for _ in range(side // 500)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def test_classify_refuses_oversized_files_from_their_header(tmp_path, monkeypatch):
    from hema_pipeline.inference.classify import classify_files, header_refusal

    small = tmp_path / "a_small.png"
    Image.fromarray(np.full((30, 34, 3), (230, 20, 20), np.uint8)).save(small)
    bomb_png = tmp_path / "b_bomb.png"
    bomb_png.write_bytes(_png_header_only(20000, 20000))  # Pillow's own guard refuses this one
    large_png = tmp_path / "c_large.png"
    large_png.write_bytes(_png_bomb(5000))  # 25 Mpx: under Pillow's guard, over ours
    large_jpeg = tmp_path / "d_large.jpg"
    large_jpeg.write_bytes(_frame_size(_jpeg((48, 40)), 40000, 40000))
    assert large_png.stat().st_size < 400_000

    monkeypatch.setenv("HEMA_MAX_IMAGE_PIXELS", "1000000")
    for path in (bomb_png, large_png, large_jpeg):
        assert "more than 1000000 pixels" in header_refusal(path, 1_000_000)
    assert header_refusal(small, 1_000_000) is None
    assert header_refusal(small, 1000) is not None

    decoded: list[object] = []
    import hema_pipeline.inference.classify as classify

    original = classify.predict_readable_images

    def spy(files, *args, **kwargs):
        decoded.extend(files)
        return original(files, *args, **kwargs)

    monkeypatch.setattr(classify, "predict_readable_images", spy)
    messages = io.StringIO()
    stream = io.StringIO()
    outcome = classify_files([small, bomb_png, large_png, large_jpeg], _classifier(), stream, messages=messages)
    assert outcome.classified == 1
    assert [failure.cell_key for failure in outcome.failures] == [str(bomb_png), str(large_png), str(large_jpeg)]
    assert all("HEMA_MAX_IMAGE_PIXELS" in failure.reason for failure in outcome.failures)
    assert decoded == [str(small)]  # nothing oversized reached the decoder
    assert f"skipped {large_png}:" in messages.getvalue()
    assert stream.getvalue().splitlines()[1].startswith(f"{small},neutrophil,")

    outcome = classify_files([small], _classifier(), io.StringIO(), progress=False, max_pixels=100)
    assert outcome.classified == 0 and "more than 100 pixels" in outcome.failures[0].reason


def _classifier() -> object:
    """As test_inference_classify's: logits = 6 x mean RGB in [0, 1]."""
    import keras

    from hema_pipeline.inference.predict import CellClassifier
    from hema_pipeline_tests.support import model_contract

    inputs = keras.Input((16, 16, 3))
    pooled = keras.layers.Rescaling(1.0 / 255.0)(keras.layers.GlobalAveragePooling2D()(inputs))
    dense = keras.layers.Dense(3, name="logits")
    model = keras.Model(inputs, dense(pooled))
    dense.set_weights([np.eye(3, dtype=np.float32) * 6.0, np.zeros(3, np.float32)])
    classes = ("neutrophil", "lymphocyte", "monocyte")
    return CellClassifier(model, model_contract("pbc", "pbc-v1", classes, 16, 1.5, dict.fromkeys(classes, 0.5), None))
