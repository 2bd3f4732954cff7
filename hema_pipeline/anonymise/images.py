"""Cell images: rebuild a JPEG from its parsed structure, prove its data complete, decode it in full.

``clean_cell_image`` never copies a segment through. It parses the marker stream, validates each segment
the decoder needs against its own length and the JPEG rules, and writes a new stream from the parsed
values only:

    SOI, [JFIF APP0], [Adobe APP14], DQT / DHT / DRI / SOF0-2 / SOS + entropy-coded data ..., EOI

- The JFIF APP0 is synthesised (version 1.0x, density units and x/y density) when the source had one
  before its first scan, and the Adobe APP14 (12 bytes: fixed version and flags, the parsed colour
  transform) when it had one: both change how libjpeg picks the colour space, so keeping them keeps the
  pixels. Nothing else of any APPn survives: not JFIF thumbnails or JFXX extensions, EXIF, XMP, ICC,
  comments (COM), DNL, unknown or reserved markers, fill bytes, anything after EOI.
- Bytes between segments that are not 0xFF fill are refused (``corrupt_image``), as are a second SOI,
  truncated or internally inconsistent segments (table lengths that do not add up to the segment
  length, component counts that do not match, undefined tables or components), RSTn markers out of
  order and an incomplete set of scans.
- The entropy-coded data is Huffman-decoded here (coefficients are skipped, not computed): every
  restart interval of every scan must hold exactly the MCUs the frame declares, in valid codes, and
  nothing else. Data that ends before the last MCU (a truncated scan followed by EOI, a frame header
  larger than its data: libjpeg only warns and fills grey, and Pillow passes that as a good image) and
  whole bytes after the last MCU of an interval (junk before the next marker, which libjpeg skips with
  an "extraneous bytes" warning) are ``corrupt_image``. Unread padding bits of the last byte are set to
  ones, stuffed 0xFF00 and restart markers are re-emitted, fill bytes are dropped.
- The frame size is checked against ``max_pixels`` before any entropy data is touched
  (``image_too_large``; Pillow's decompression-bomb errors and warnings map to it too). Arithmetic
  coding, lossless, hierarchical and non-8-bit JPEGs are ``unsupported_jpeg``.
- The rebuilt stream is then decoded in full by Pillow (no draft scale), which must succeed and give
  the header's size.

Not guaranteed: text an encoder hides *inside* the entropy-coded data, as coefficient values, decodes as
pixel noise and cannot be removed without re-encoding, which would change the pixels a model sees. The
pixels of the rebuilt file are bit-identical to those of the original.

Reasons are fixed texts: they never echo bytes or values from the file, because they reach logs.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 4_000_000  # a CellaVision cell is 360 x 363 = 130,680 pixels

NOT_AN_IMAGE = "not_an_image"
CORRUPT_IMAGE = "corrupt_image"
IMAGE_TOO_LARGE = "image_too_large"
UNSUPPORTED_JPEG = "unsupported_jpeg"
REASON_CODES: frozenset[str] = frozenset({NOT_AN_IMAGE, CORRUPT_IMAGE, IMAGE_TOO_LARGE, UNSUPPORTED_JPEG})

SOI, EOI, SOS = 0xD8, 0xD9, 0xDA
SOF0, SOF1, SOF2 = 0xC0, 0xC1, 0xC2
DHT, DQT, DRI, DNL, COM = 0xC4, 0xDB, 0xDD, 0xDC, 0xFE
APP0, APP14 = 0xE0, 0xEE
_RST = range(0xD0, 0xD8)
# Arithmetic coding (SOF9-11, 13-15, DAC), lossless (SOF3), hierarchical (SOF5-7, DHP, EXP), JPG.
_UNSUPPORTED = {0xC3, 0xC5, 0xC6, 0xC7, 0xC8, 0xC9, 0xCA, 0xCB, 0xCC, 0xCD, 0xCE, 0xCF, 0xDE, 0xDF}
_MAX_SCANS = 100  # libjpeg's progressive scripts use 6-10; each scan costs a pass over every block
_MAX_BLOCKS_IN_MCU = 10  # libjpeg's D_MAX_BLOCKS_IN_MCU
_PAD = b"\xff" * 16  # read past the end of an interval's data only to find that it is too short


class ImageRejected(ValueError):
    """The file cannot be imported as a cell image; ``code`` is the quarantine reason code."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class CleanImage:
    jpeg: bytes
    width: int
    height: int


def _corrupt(reason: str) -> ImageRejected:
    return ImageRejected(CORRUPT_IMAGE, reason)


# ---------------------------------------------------------------------------------------------------
# Parsed segments


@dataclass(frozen=True)
class _Component:
    ident: int
    h: int
    v: int
    quant: int


@dataclass(frozen=True)
class _Frame:
    marker: int
    height: int
    width: int
    components: tuple[_Component, ...]

    @property
    def progressive(self) -> bool:
        return self.marker == SOF2


@dataclass(frozen=True)
class _QuantTable:
    precision: int  # 0: 8-bit values, 1: 16-bit
    ident: int
    values: tuple[int, ...]


@dataclass(frozen=True)
class _HuffmanTable:
    table_class: int  # 0: DC, 1: AC
    ident: int
    counts: bytes  # 16 code counts, by length
    symbols: bytes


@dataclass
class _Scan:
    components: tuple[tuple[int, int, int], ...]  # (index in the frame, DC table, AC table)
    ss: int
    se: int
    ah: int
    al: int
    intervals: list[bytes]  # de-stuffed entropy-coded data of each restart interval
    restart_markers: list[int] = field(default_factory=list)  # the RSTn numbers between intervals


@dataclass
class _Parsed:
    segments: list[tuple[int, object]]  # (marker, parsed value) in file order
    jfif: tuple[int, int, int, int] | None = None  # minor version, units, x density, y density
    adobe_transform: int | None = None
    frame: _Frame | None = None


def _u16(data: bytes, offset: int) -> int:
    return (data[offset] << 8) | data[offset + 1]


def _parse_dqt(payload: bytes) -> tuple[_QuantTable, ...]:
    tables = []
    position = 0
    while position < len(payload):
        precision, ident = payload[position] >> 4, payload[position] & 0x0F
        if precision > 1 or ident > 3:
            raise _corrupt("quantisation table header out of range")
        size = 64 * (precision + 1)
        values = payload[position + 1 : position + 1 + size]
        if len(values) != size:
            raise _corrupt("quantisation table segment length does not match its tables")
        if precision:
            tables.append(_QuantTable(1, ident, tuple(_u16(values, 2 * i) for i in range(64))))
        else:
            tables.append(_QuantTable(0, ident, tuple(values)))
        position += 1 + size
    if not tables:
        raise _corrupt("empty quantisation table segment")
    return tuple(tables)


def _parse_dht(payload: bytes) -> tuple[_HuffmanTable, ...]:
    tables = []
    position = 0
    while position < len(payload):
        if position + 17 > len(payload):
            raise _corrupt("Huffman table segment length does not match its tables")
        table_class, ident = payload[position] >> 4, payload[position] & 0x0F
        if table_class > 1 or ident > 3:
            raise _corrupt("Huffman table header out of range")
        counts = bytes(payload[position + 1 : position + 17])
        total = sum(counts)
        if total > 256:
            raise _corrupt("Huffman table has too many codes")
        symbols = bytes(payload[position + 17 : position + 17 + total])
        if len(symbols) != total:
            raise _corrupt("Huffman table segment length does not match its tables")
        tables.append(_HuffmanTable(table_class, ident, counts, symbols))
        position += 17 + total
    if not tables:
        raise _corrupt("empty Huffman table segment")
    return tuple(tables)


def _parse_sof(marker: int, payload: bytes, max_pixels: int) -> _Frame:
    if len(payload) < 6:
        raise _corrupt("frame header too short")
    precision, height, width, count = payload[0], _u16(payload, 1), _u16(payload, 3), payload[5]
    if len(payload) != 6 + 3 * count:
        raise _corrupt("frame header length does not match its component count")
    if precision != 8:
        raise ImageRejected(UNSUPPORTED_JPEG, "only 8-bit JPEG is supported")
    if height == 0:
        raise ImageRejected(UNSUPPORTED_JPEG, "frame height defined by a DNL segment is not supported")
    if width == 0:
        raise _corrupt("frame header declares zero width")
    if width * height > max_pixels:
        raise ImageRejected(IMAGE_TOO_LARGE, f"frame header declares more than {max_pixels} pixels")
    if count not in (1, 3, 4):
        raise ImageRejected(UNSUPPORTED_JPEG, "only 1, 3 or 4 colour components are supported")
    components = []
    for index in range(count):
        ident, sampling, quant = payload[6 + 3 * index : 9 + 3 * index]
        h, v = sampling >> 4, sampling & 0x0F
        if not (1 <= h <= 4 and 1 <= v <= 4) or quant > 3:
            raise _corrupt("frame component parameters out of range")
        components.append(_Component(ident, h, v, quant))
    if len({component.ident for component in components}) != count:
        raise _corrupt("frame header repeats a component")
    return _Frame(marker, height, width, tuple(components))


def _parse_sos_header(payload: bytes, frame: _Frame) -> _Scan:
    if not payload:
        raise _corrupt("scan header too short")
    count = payload[0]
    if not 1 <= count <= 4 or len(payload) != 4 + 2 * count:
        raise _corrupt("scan header length does not match its component count")
    identifiers = [component.ident for component in frame.components]
    components = []
    for index in range(count):
        selector, tables = payload[1 + 2 * index], payload[2 + 2 * index]
        if selector not in identifiers:
            raise _corrupt("scan names a component the frame does not have")
        if tables >> 4 > 3 or tables & 0x0F > 3:
            raise _corrupt("scan names a Huffman table out of range")
        components.append((identifiers.index(selector), tables >> 4, tables & 0x0F))
    if len({component[0] for component in components}) != count:
        raise _corrupt("scan repeats a component")
    ss, se, approximation = payload[1 + 2 * count], payload[2 + 2 * count], payload[3 + 2 * count]
    return _Scan(tuple(components), ss, se, approximation >> 4, approximation & 0x0F, [])


def _read_entropy_coded_data(data: bytes, position: int, scan: _Scan) -> int:
    """Split the entropy-coded data after a scan header into de-stuffed restart intervals; returns the
    position of the 0xFF of the marker that ends it. Only stuffed 0xFF00, RST0-7 and fill 0xFF before
    a marker are data here (a run of 0xFF before 0x00 is read as one data byte 0xFF, as libjpeg does)."""
    length = len(data)
    pieces: list[bytes] = []
    while True:
        found = data.find(b"\xff", position)
        if found < 0:
            raise _corrupt("JPEG truncated: scan data has no end-of-image marker")
        following = found + 1
        while following < length and data[following] == 0xFF:
            following += 1
        if following >= length:
            raise _corrupt("JPEG truncated: scan data has no end-of-image marker")
        byte = data[following]
        pieces.append(data[position:found])
        if byte == 0x00:
            pieces.append(b"\xff")
        elif 0xD0 <= byte <= 0xD7:
            scan.intervals.append(b"".join(pieces))
            scan.restart_markers.append(byte - 0xD0)
            pieces = []
        else:
            scan.intervals.append(b"".join(pieces))
            return following - 1
        position = following + 1


def _parse(data: bytes, max_pixels: int) -> _Parsed:
    if data[:2] != b"\xff\xd8":
        raise ImageRejected(NOT_AN_IMAGE, "not a JPEG file (no start-of-image marker)")
    parsed = _Parsed([])
    position = 2
    length = len(data)
    scans = 0
    while True:
        if position >= length:
            raise _corrupt("JPEG structure truncated before end-of-image")
        if data[position] != 0xFF:
            raise _corrupt("bytes that are not a marker between JPEG segments")
        while position + 1 < length and data[position + 1] == 0xFF:
            position += 1  # fill bytes
        if position + 1 >= length:
            raise _corrupt("JPEG structure truncated before end-of-image")
        marker = data[position + 1]
        if marker == EOI:
            if parsed.frame is None or not scans:
                raise _corrupt("JPEG has no image data")
            return parsed
        if marker == SOI:
            raise _corrupt("a second start-of-image marker inside the JPEG")
        if marker == 0x00:
            raise _corrupt("bytes that are not a marker between JPEG segments")
        if marker == 0x01 or marker in _RST:
            position += 2  # TEM and a stray RSTn carry nothing; libjpeg ignores them too
            continue
        if marker in _UNSUPPORTED:
            raise ImageRejected(
                UNSUPPORTED_JPEG, "arithmetic-coded, lossless and hierarchical JPEG are not supported"
            )
        if position + 4 > length:
            raise _corrupt("JPEG truncated inside a segment header")
        segment_length = _u16(data, position + 2)
        end = position + 2 + segment_length
        if segment_length < 2 or end > length:
            raise _corrupt("JPEG truncated inside a segment")
        payload = data[position + 4 : end]
        position = end
        if marker in (SOF0, SOF1, SOF2):
            if parsed.frame is not None:
                raise _corrupt("JPEG has more than one frame header")
            parsed.frame = _parse_sof(marker, payload, max_pixels)
            parsed.segments.append((marker, parsed.frame))
        elif marker == DQT:
            parsed.segments.append((marker, _parse_dqt(payload)))
        elif marker == DHT:
            parsed.segments.append((marker, _parse_dht(payload)))
        elif marker == DRI:
            if len(payload) != 2:
                raise _corrupt("restart interval segment has the wrong length")
            parsed.segments.append((marker, _u16(payload, 0)))
        elif marker == SOS:
            if parsed.frame is None:
                raise _corrupt("scan before the frame header")
            scans += 1
            if scans > _MAX_SCANS:
                raise ImageRejected(UNSUPPORTED_JPEG, f"more than {_MAX_SCANS} scans")
            scan = _parse_sos_header(payload, parsed.frame)
            position = _read_entropy_coded_data(data, position, scan)
            parsed.segments.append((marker, scan))
        elif not scans and marker == APP0 and len(payload) >= 14 and payload[:5] == b"JFIF\x00":
            # libjpeg: a JFIF APP0 of at least 14 bytes makes a 3-component image YCbCr.
            minor = payload[6] if payload[5] == 1 and payload[6] <= 2 else 1
            units = payload[7] if payload[7] <= 2 else 0
            x_density, y_density = _u16(payload, 8) or 1, _u16(payload, 10) or 1
            parsed.jfif = (minor, units, x_density, y_density)
        elif not scans and marker == APP14 and len(payload) >= 12 and payload[:5] == b"Adobe":
            transform = payload[11]
            if transform > 2:
                raise _corrupt("Adobe colour transform out of range")
            parsed.adobe_transform = transform  # libjpeg uses the last one before the first scan
        # Anything else (other APPn, COM, DNL, reserved markers) is dropped.


# ---------------------------------------------------------------------------------------------------
# Entropy-coded data: Huffman-decode every scan to prove it holds exactly the declared MCUs


# Analysers reuse a few sets of Huffman tables; a lookup list is 0.5 MB, a many-symbol one ~2 MB.
@lru_cache(maxsize=32)
def _lookup_table(counts: bytes, symbols: bytes, kind: str) -> list[int]:
    """A 16-bit lookup table over the next 16 bits of data; 0 is an invalid code. Entries:
    ``"dc"``: code length + magnitude bits; ``"ac"`` (sequential): bits consumed | (coefficient
    positions advanced, 0 for end-of-block) << 8; ``"raw"``: code length | symbol << 5."""
    table = [0] * 65536
    code = 0
    index = 0
    for length in range(1, 17):
        for _ in range(counts[length - 1]):
            if code >= 1 << length:
                raise _corrupt("Huffman table is over-subscribed")
            symbol = symbols[index]
            index += 1
            if kind == "dc":
                if symbol > 15:
                    raise _corrupt("DC Huffman table has a symbol out of range")
                entry = length + symbol
            elif kind == "ac":
                size, run = symbol & 0x0F, symbol >> 4
                advance = run + 1 if size else (16 if run == 15 else 0)
                entry = (length + size) | advance << 8
            else:
                entry = length | symbol << 5
            shift = 16 - length
            table[code << shift : (code + 1) << shift] = [entry] * (1 << shift)
            code += 1
        code <<= 1
    return table


def _premature() -> ImageRejected:
    return _corrupt("JPEG scan data ends before the image does (truncated or corrupt entropy-coded data)")


def _bad_code() -> ImageRejected:
    return _corrupt("JPEG scan data is corrupt (invalid Huffman code or coefficient index)")


def _whole_symbols(
    single: np.ndarray, used: np.ndarray, advanced: np.ndarray, limit: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode sequential AC symbols from the 16-bit windows ``0..65535`` starting at bit ``used`` of
    each, while each whole symbol fits in the window and ``advanced`` stays below ``limit``."""
    window = np.arange(65536, dtype=np.int64)
    end_of_block = np.zeros(65536, bool)
    done = used > 16
    for _ in range(16):
        entry = single[(window << np.minimum(used, 16)) & 0xFFFF]
        consumed, advance = entry & 0xFF, entry >> 8
        fits = ~done & (entry != 0) & (used + consumed <= 16) & (advanced + advance < limit)
        used = used + np.where(fits, consumed, 0)
        advanced = advanced + np.where(fits, advance, 0)
        ends = fits & (advance == 0)
        end_of_block |= ends
        done |= ~fits | ends
        if done.all():
            break
    return used, advanced, end_of_block


@lru_cache(maxsize=8)
def _multi_symbol_table(counts: bytes, symbols: bytes) -> list[int]:
    """For sequential AC data: every whole symbol (code and magnitude bits) the next 16 bits hold, up to
    and including an end-of-block. Entries: bits consumed | positions advanced << 5 | end-of-block << 15;
    0 where not even one symbol fits (then the one-symbol table decides)."""
    single = np.array(_lookup_table(counts, symbols, "ac"), dtype=np.int64)
    used, advanced, end_of_block = _whole_symbols(single, np.zeros(65536, np.int64), np.zeros(65536, np.int64), 1024)
    return np.where(used > 0, used | advanced << 5 | end_of_block.astype(np.int64) << 15, 0).tolist()


@lru_cache(maxsize=8)
def _block_start_table(dc_counts: bytes, dc_symbols: bytes, ac_counts: bytes, ac_symbols: bytes) -> list[int]:
    """The DC symbol and then the AC symbols that the next 16 bits hold whole (as _multi_symbol_table),
    never reaching the block's last coefficient; 0 where the DC symbol does not fit."""
    dc = np.array(_lookup_table(dc_counts, dc_symbols, "dc"), dtype=np.int64)
    single = np.array(_lookup_table(ac_counts, ac_symbols, "ac"), dtype=np.int64)
    start = np.where(dc == 0, 17, dc)
    used, advanced, end_of_block = _whole_symbols(single, start, np.zeros(65536, np.int64), 63)
    entry = used | advanced << 5 | end_of_block.astype(np.int64) << 15
    return np.where(start <= 16, entry, 0).tolist()


def _sequential_interval(data: bytes, mcus: int, blocks: list[tuple[list[int], ...]]) -> int:
    """Bits used by ``mcus`` MCUs of a sequential scan (``blocks``: for each block of an MCU, its
    tables: block start, DC, AC many-symbol, AC one-symbol)."""
    # Refilling from position n + 8 of n bytes means more than all n bytes were used (at least 64 bits
    # were pulled from the padding and fewer than 32 remain): the data is too short.
    last = len(data) + 7
    data += _PAD
    from_bytes = int.from_bytes
    accumulator = 0
    available = 0
    position = 0
    try:
        for _ in range(mcus):
            for start, dc, multi, ac in blocks:
                if available < 32:
                    if position > last:
                        raise _premature()
                    accumulator = ((accumulator & ((1 << available) - 1)) << 48) | from_bytes(
                        data[position : position + 6], "big"
                    )
                    position += 6
                    available += 48
                peek = (accumulator >> (available - 16)) & 0xFFFF
                entry = start[peek]
                if entry:
                    available -= entry & 0x1F
                    if entry >> 15:
                        continue
                    k = 1 + ((entry >> 5) & 0x3FF)
                else:
                    entry = dc[peek]
                    if not entry:
                        raise _bad_code()
                    available -= entry
                    k = 1
                while k < 64:
                    if available < 32:
                        if position > last:
                            raise _premature()
                        accumulator = ((accumulator & ((1 << available) - 1)) << 48) | from_bytes(
                            data[position : position + 6], "big"
                        )
                        position += 6
                        available += 48
                    peek = (accumulator >> (available - 16)) & 0xFFFF
                    entry = multi[peek]
                    if entry and k + ((entry >> 5) & 0x3FF) < 64:
                        available -= entry & 0x1F
                        if entry >> 15:
                            break
                        k += (entry >> 5) & 0x3FF
                        continue
                    entry = ac[peek]
                    if not entry:
                        raise _bad_code()
                    available -= entry & 0xFF
                    entry >>= 8
                    if not entry:
                        break
                    k += entry
                if k > 64:
                    raise _bad_code()
    except ImageRejected:
        if 8 * position - available + 16 > 8 * (last - 7):
            raise _premature() from None  # an invalid code read from beyond the data: the data is short
        raise
    return 8 * position - available


# The progressive scans (rare in cell images) read bits at an absolute position ``position`` of the
# data (padded with _PAD): the next 16 bits are (int.from_bytes(data[byte : byte + 3]) >> (8 - bit)),
# with byte, bit = divmod(position, 8). Whatever fails while a read reached past the end is "too short".


def _dc_first_interval(data: bytes, mcus: int, tables: list[list[int]]) -> int:
    end = 8 * len(data)
    data += _PAD
    from_bytes = int.from_bytes
    position = 0
    try:
        for _ in range(mcus):
            for table in tables:
                byte = position >> 3
                entry = table[(from_bytes(data[byte : byte + 3], "big") >> (8 - (position & 7))) & 0xFFFF]
                if not entry:
                    raise _bad_code()
                position += entry
            if position > end:
                raise _premature()
    except ImageRejected:
        if position + 16 > end:
            raise _premature() from None
        raise
    return position


def _ac_first_interval(data: bytes, blocks: range, table: list[int], ss: int, se: int, masks: list[int]) -> int:
    end = 8 * len(data)
    data += _PAD
    from_bytes = int.from_bytes
    position = 0
    try:
        block = blocks.start
        eob_run = 0
        while block < blocks.stop:
            if eob_run:
                skipped = min(eob_run, blocks.stop - block)
                block += skipped
                eob_run -= skipped
                continue
            mask = masks[block]
            k = ss
            while k <= se:
                byte = position >> 3
                entry = table[(from_bytes(data[byte : byte + 3], "big") >> (8 - (position & 7))) & 0xFFFF]
                if not entry:
                    raise _bad_code()
                position += entry & 31
                size, run = (entry >> 5) & 0x0F, entry >> 9
                if size:
                    k += run
                    if k > se:
                        raise _bad_code()
                    position += size
                    mask |= 1 << k
                    k += 1
                elif run == 15:
                    k += 16
                    if k > se + 1:
                        raise _bad_code()
                else:
                    eob_run = (1 << run) - 1
                    if run:
                        byte = position >> 3
                        window = from_bytes(data[byte : byte + 4], "big")
                        eob_run += (window >> (32 - (position & 7) - run)) & ((1 << run) - 1)
                        position += run
                    break
            masks[block] = mask
            block += 1
            if position > end:
                raise _premature()
    except ImageRejected:
        if position + 16 > end:
            raise _premature() from None
        raise
    return position


def _ac_refine_interval(data: bytes, blocks: range, table: list[int], ss: int, se: int, masks: list[int]) -> int:
    end = 8 * len(data)
    data += _PAD
    from_bytes = int.from_bytes
    position = 0
    try:
        band = ((1 << (se + 1)) - 1) & ~((1 << ss) - 1)
        eob_run = 0
        block = blocks.start
        while block < blocks.stop:
            if eob_run:
                # Blocks inside an end-of-band run: one correction bit per already-nonzero coefficient.
                skipped = min(eob_run, blocks.stop - block)
                position += sum((mask & band).bit_count() for mask in masks[block : block + skipped])
                block += skipped
                eob_run -= skipped
                if position > end:
                    raise _premature()
                continue
            mask = masks[block]
            k = ss
            while k <= se:
                byte = position >> 3
                entry = table[(from_bytes(data[byte : byte + 3], "big") >> (8 - (position & 7))) & 0xFFFF]
                if not entry:
                    raise _bad_code()
                position += entry & 31
                size, run = (entry >> 5) & 0x0F, entry >> 9
                if size:
                    if size != 1:
                        raise _bad_code()
                    position += 1  # sign of the newly nonzero coefficient
                elif run != 15:
                    eob_run = 1 << run
                    if run:
                        byte = position >> 3
                        window = from_bytes(data[byte : byte + 4], "big")
                        eob_run += (window >> (32 - (position & 7) - run)) & ((1 << run) - 1)
                        position += run
                    # The rest of this block is the run's first block.
                    position += (mask & band & ~((1 << k) - 1)).bit_count()
                    eob_run -= 1
                    break
                # Pass `run` still-zero coefficients and stop at the next one (the new coefficient's
                # place, or the 16th zero of a ZRL); every already-nonzero one passed has a correction bit.
                zeros = ~mask & band & ~((1 << k) - 1)
                for _ in range(run):
                    zeros &= zeros - 1
                if not zeros:
                    raise _bad_code()
                target = (zeros & -zeros).bit_length() - 1
                position += (mask & ((1 << target) - (1 << k))).bit_count()
                k = target
                if size:
                    mask |= 1 << k
                k += 1
            masks[block] = mask
            block += 1
            if position > end:
                raise _premature()
    except ImageRejected:
        if position + 16 > end:
            raise _premature() from None
        raise
    return position


def _finish_interval(data: bytes, used_bits: int) -> bytes:
    """The interval's data as written: every byte must hold bits the decoder reads (libjpeg warns of
    "extraneous bytes" otherwise, which this treats as an error); unread padding bits are set to one."""
    if used_bits > 8 * len(data):
        raise _premature()
    if len(data) - (used_bits + 7) // 8:
        raise _corrupt("JPEG scan data has bytes after its last MCU (extraneous data)")
    if not used_bits % 8:
        return data
    kept = bytearray(data)
    kept[-1] |= (1 << (8 - used_bits % 8)) - 1
    return bytes(kept)


def _block_count(size: int, sampling: int, max_sampling: int) -> int:
    samples = -(-size * sampling // max_sampling)
    return -(-samples // 8)


def _check_scans(parsed: _Parsed) -> None:
    """Huffman-decode every scan in file order (tables and restart interval as in effect at each),
    check the progression and replace each scan's intervals by exactly the data the decoder uses."""
    frame = parsed.frame
    assert frame is not None
    components = frame.components
    h_max = max(component.h for component in components)
    v_max = max(component.v for component in components)
    mcus_x = -(-frame.width // (8 * h_max))
    mcus_y = -(-frame.height // (8 * v_max))
    block_shape = [
        (_block_count(frame.width, c.h, h_max), _block_count(frame.height, c.v, v_max)) for c in components
    ]
    quant: set[int] = set()
    huffman: dict[tuple[int, int], _HuffmanTable] = {}
    restart_interval = 0
    coefficient_bits = [[-1] * 64 for _ in components]  # progressive: the last Al of each coefficient
    masks: list[list[int] | None] = [None] * len(components)  # progressive: nonzero AC coefficients
    scanned = [False] * len(components)

    def lookup(table_class: int, ident: int, kind: str) -> list[int]:
        table = huffman.get((table_class, ident))
        if table is None:
            raise _corrupt("scan uses a Huffman table that is not defined")
        return _lookup_table(table.counts, table.symbols, kind)

    for marker, value in parsed.segments:
        if marker == DQT:
            quant.update(table.ident for table in value)  # type: ignore[attr-defined]
        elif marker == DHT:
            for table in value:  # type: ignore[attr-defined]
                huffman[(table.table_class, table.ident)] = table
        elif marker == DRI:
            restart_interval = value  # type: ignore[assignment]
        elif marker == SOS:
            scan: _Scan = value  # type: ignore[assignment]
            for index, _, _ in scan.components:
                if components[index].quant not in quant:
                    raise _corrupt("scan uses a quantisation table that is not defined")
            if len(scan.components) == 1:
                index = scan.components[0][0]
                width, height = block_shape[index]
                total_mcus, blocks_per_mcu = width * height, 1
            else:
                total_mcus = mcus_x * mcus_y
                blocks_per_mcu = sum(components[index].h * components[index].v for index, _, _ in scan.components)
                if blocks_per_mcu > _MAX_BLOCKS_IN_MCU:
                    raise _corrupt("scan has too many blocks per MCU")
            per_interval = restart_interval or total_mcus
            expected = -(-total_mcus // per_interval)
            if len(scan.intervals) == expected + 1 and not scan.intervals[-1]:
                scan.intervals.pop()  # an empty interval after a final RSTn carries nothing
                scan.restart_markers.pop()
            if len(scan.intervals) != expected:
                raise _corrupt("scan has the wrong number of restart intervals for its MCUs")
            if any(number != index % 8 for index, number in enumerate(scan.restart_markers)):
                raise _corrupt("restart markers out of sequence")
            intervals = [(start, min(per_interval, total_mcus - start)) for start in range(0, total_mcus, per_interval)]

            if not frame.progressive:
                if (scan.ss, scan.se, scan.ah, scan.al) != (0, 63, 0, 0):
                    raise _corrupt("sequential scan with progressive parameters")
                for index, _, _ in scan.components:
                    if scanned[index]:
                        raise _corrupt("component appears in more than one scan")
                    scanned[index] = True
                blocks = []
                for index, dc, ac in scan.components:
                    count = 1 if len(scan.components) == 1 else components[index].h * components[index].v
                    dc_table, ac_table = lookup(0, dc, "dc"), lookup(1, ac, "ac")  # checks that both exist
                    d, a = huffman[(0, dc)], huffman[(1, ac)]
                    start = _block_start_table(d.counts, d.symbols, a.counts, a.symbols)
                    blocks += [(start, dc_table, _multi_symbol_table(a.counts, a.symbols), ac_table)] * count
                used = [_sequential_interval(data, n, blocks) for data, (_, n) in zip(scan.intervals, intervals)]
            else:
                used = _check_progressive_scan(scan, intervals, components, block_shape, coefficient_bits, masks, lookup)
            scan.intervals = [_finish_interval(data, bits) for data, bits in zip(scan.intervals, used)]

    if frame.progressive:
        if any(bit != 0 for bits in coefficient_bits for bit in bits):
            raise _corrupt("progressive JPEG is missing scans (incomplete image)")
    elif not all(scanned):
        raise _corrupt("JPEG is missing the scan of a colour component")


def _check_progressive_scan(
    scan: _Scan,
    intervals: list[tuple[int, int]],
    components: tuple[_Component, ...],
    block_shape: list[tuple[int, int]],
    coefficient_bits: list[list[int]],
    masks: list[list[int] | None],
    lookup: Callable[[int, int, str], list[int]],
) -> list[int]:
    """Bits used by each interval of one progressive scan, after checking its place in the progression."""
    ss, se, ah, al = scan.ss, scan.se, scan.ah, scan.al
    if ss == 0:
        if se != 0:
            raise _corrupt("progressive DC scan with AC coefficients")
    elif se < ss or se > 63 or len(scan.components) != 1:
        raise _corrupt("progressive AC scan parameters out of range")
    if al > 13 or (ah and ah != al + 1):
        raise _corrupt("progressive successive-approximation parameters out of range")
    for index, _, _ in scan.components:
        bits = coefficient_bits[index]
        if ss > 0 and bits[0] < 0:
            raise _corrupt("progressive AC scan before the DC scan")
        for k in range(ss, se + 1):
            if bits[k] != (ah if ah else -1):
                raise _corrupt("progressive scans out of order")
            bits[k] = al
    if ss == 0:
        if ah:  # DC refinement: one bit per block, no Huffman codes
            per_mcu = sum(
                1 if len(scan.components) == 1 else components[index].h * components[index].v
                for index, _, _ in scan.components
            )
            return [n * per_mcu for _, n in intervals]
        tables = []
        for index, dc, _ in scan.components:
            count = 1 if len(scan.components) == 1 else components[index].h * components[index].v
            tables += [lookup(0, dc, "dc")] * count
        return [_dc_first_interval(data, n, tables) for data, (_, n) in zip(scan.intervals, intervals)]
    index, _, ac = scan.components[0]
    component_masks = masks[index]
    if component_masks is None:
        width, height = block_shape[index]
        component_masks = masks[index] = [0] * (width * height)
    table = lookup(1, ac, "raw")
    walk = _ac_refine_interval if ah else _ac_first_interval
    return [
        walk(data, range(start, start + n), table, ss, se, component_masks)
        for data, (start, n) in zip(scan.intervals, intervals)
    ]


# ---------------------------------------------------------------------------------------------------
# Writing the new stream


def _segment(marker: int, payload: bytes) -> bytes:
    return bytes((0xFF, marker)) + (len(payload) + 2).to_bytes(2, "big") + payload


def _serialise(parsed: _Parsed) -> bytes:
    out = bytearray(b"\xff\xd8")
    if parsed.jfif is not None:
        minor, units, x_density, y_density = parsed.jfif
        payload = b"JFIF\x00" + bytes((1, minor, units)) + x_density.to_bytes(2, "big") + y_density.to_bytes(2, "big")
        out += _segment(APP0, payload + b"\x00\x00")
    if parsed.adobe_transform is not None:
        out += _segment(APP14, b"Adobe" + (100).to_bytes(2, "big") + b"\x00\x00\x00\x00" + bytes((parsed.adobe_transform,)))
    for marker, value in parsed.segments:
        if marker == DQT:
            payload = bytearray()
            for table in value:  # type: ignore[attr-defined]
                payload.append(table.precision << 4 | table.ident)
                if table.precision:
                    payload += b"".join(number.to_bytes(2, "big") for number in table.values)
                else:
                    payload += bytes(table.values)
            out += _segment(DQT, bytes(payload))
        elif marker == DHT:
            payload = bytearray()
            for table in value:  # type: ignore[attr-defined]
                payload.append(table.table_class << 4 | table.ident)
                payload += table.counts + table.symbols
            out += _segment(DHT, bytes(payload))
        elif marker == DRI:
            out += _segment(DRI, int(value).to_bytes(2, "big"))  # type: ignore[call-overload]
        elif marker in (SOF0, SOF1, SOF2):
            frame: _Frame = value  # type: ignore[assignment]
            payload = bytearray((8,)) + frame.height.to_bytes(2, "big") + frame.width.to_bytes(2, "big")
            payload.append(len(frame.components))
            for component in frame.components:
                payload += bytes((component.ident, component.h << 4 | component.v, component.quant))
            out += _segment(marker, bytes(payload))
        elif marker == SOS:
            scan: _Scan = value  # type: ignore[assignment]
            frame = parsed.frame  # type: ignore[assignment]
            payload = bytearray((len(scan.components),))
            for index, dc, ac in scan.components:
                payload += bytes((frame.components[index].ident, dc << 4 | ac))
            payload += bytes((scan.ss, scan.se, scan.ah << 4 | scan.al))
            out += _segment(SOS, bytes(payload))
            for number, data in enumerate(scan.intervals):
                if number:
                    out += bytes((0xFF, 0xD0 + (number - 1) % 8))
                out += data.replace(b"\xff", b"\xff\x00")
    out += b"\xff\xd9"
    return bytes(out)


def _rebuild(data: bytes, max_pixels: int) -> tuple[bytes, _Frame]:
    parsed = _parse(data, max_pixels)
    _check_scans(parsed)
    assert parsed.frame is not None
    return _serialise(parsed), parsed.frame


def strip_jpeg_metadata(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """The JPEG rebuilt from its parsed decoding segments and the entropy-coded data its decoder uses
    (see the module docstring); raises ``ImageRejected``. Does not run the pixel decode."""
    return _rebuild(data, max_pixels)[0]


def clean_cell_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> CleanImage:
    """Rebuild the JPEG without metadata, prove its entropy-coded data complete, then decode it in full:
    a truncated, corrupt or oversized file is rejected here, not when a model later trips over it."""
    if not data:
        raise ImageRejected(NOT_AN_IMAGE, "empty file")
    rebuilt, frame = _rebuild(data, max_pixels)
    frame_size = (frame.width, frame.height)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(rebuilt)) as image:
                if image.format != "JPEG":
                    raise ImageRejected(NOT_AN_IMAGE, "not a JPEG image")
                if image.size != frame_size:
                    raise _corrupt("decoder reads a different size than the frame header")
                image.load()
                if image.size != frame_size:
                    raise _corrupt("decoded size differs from the frame header")
                if image.mode not in ("RGB", "L", "CMYK"):
                    raise ImageRejected(UNSUPPORTED_JPEG, "unsupported JPEG colour mode")
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageRejected(IMAGE_TOO_LARGE, "image exceeds the decoder's decompression-bomb limit") from None
    except UnidentifiedImageError:
        raise ImageRejected(NOT_AN_IMAGE, "not a readable image") from None
    except (OSError, SyntaxError, ValueError, MemoryError):
        raise _corrupt("JPEG does not decode") from None
    return CleanImage(jpeg=rebuilt, width=frame_size[0], height=frame_size[1])

