"""Cell images: rebuild a JPEG from its parsed structure, decode it in full with warnings as errors.

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
- The entropy-coded data is split at its RSTn markers, de-stuffed and written back as it was parsed
  (re-stuffed, with RST0-7 renumbered in order; fill bytes are dropped). Each scan must have exactly
  the restart intervals its MCUs need, every interval at least the fewest bits its MCUs can be coded in
  (exactly the right length for a DC refinement scan), and a progressive image exactly one complete
  progression (every coefficient of every component, each successive-approximation bit in order).
  None of this needs the data decoded; it also refuses a huge frame header on a little data before
  anything is decoded or allocated.
- The frame size is checked against ``max_pixels`` before any entropy data is touched
  (``image_too_large``; Pillow's decompression-bomb limit, ``Image.MAX_IMAGE_PIXELS``, maps to it too).
  Arithmetic coding, lossless, hierarchical and non-8-bit JPEGs are ``unsupported_jpeg``.
- The rebuilt stream is then decoded in full by libjpeg-turbo (``simplejpeg``, which releases the GIL)
  with every libjpeg warning an error, and must give the header's size. libjpeg only *warns* where
  data ends before the last MCU (a truncated scan followed by EOI, a frame header larger than its
  data: it fills grey, and Pillow passes that as a good image), at invalid Huffman codes and where
  whole bytes follow the last MCU of an interval (junk before the next marker, which it skips): all
  are ``corrupt_image`` here. It reports that junk only in part (up to 7 bytes it has already read
  into its bit buffer pass unreported at the end of a scan, and before an RSTn when the buffer already
  holds the marker), so two more decodes at 1/8 DCT scale (which still decode every Huffman code)
  prove each interval used to its last byte: one with an empty COM after each scan, where libjpeg
  then reports the bytes it skipped before every RSTn of that scan, and, for each scan, one without
  the last byte of its last interval, which must then run out of data.

Not guaranteed: text an encoder hides *inside* the entropy-coded data, as coefficient values, decodes as
pixel noise and cannot be removed without re-encoding, which would change the pixels a model sees. Nor
are the padding bits after the last code of each restart interval normalised: up to 7 bits per interval
pass as the file had them. A zero run that goes past the end of a block (sequential, or past Se in a
progressive AC scan) or, in an AC refinement scan, past the band's last zero coefficient is not
detected: libjpeg clamps it without a warning, and Pillow decodes such a file the same way. The pixels
of the rebuilt file are bit-identical to those of the original.

Reasons are fixed texts: they never echo bytes or values from the file, because they reach logs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import simplejpeg
from PIL import Image

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
            raise ImageRejected(UNSUPPORTED_JPEG, "arithmetic-coded, lossless and hierarchical JPEG are not supported")
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
# Scans: structure, progression and a lower bound on their data, all from the headers (no entropy decode)


def _premature() -> ImageRejected:
    return _corrupt("JPEG scan data ends before the image does (truncated or corrupt entropy-coded data)")


def _bad_code() -> ImageRejected:
    return _corrupt("JPEG scan data is corrupt (invalid Huffman code or coefficient index)")


def _extraneous() -> ImageRejected:
    return _corrupt("JPEG scan data has bytes after its last MCU (extraneous data)")


def _shortest_code(table: _HuffmanTable) -> int:
    """The length of the table's shortest code (a lower bound on the bits of one symbol), after the
    checks libjpeg makes when it builds a decoding table."""
    code = 0
    for length, count in enumerate(table.counts, 1):
        code += count
        if code > 1 << length:
            raise _corrupt("Huffman table is over-subscribed")
        code <<= 1
    if table.table_class == 0 and any(symbol > 15 for symbol in table.symbols):
        raise _corrupt("DC Huffman table has a symbol out of range")
    shortest = next((length for length, count in enumerate(table.counts, 1) if count), 0)
    if not shortest:
        raise _bad_code()  # a table without codes: no symbol of the scan can be decoded
    return shortest


def _block_count(size: int, sampling: int, max_sampling: int) -> int:
    samples = -(-size * sampling // max_sampling)
    return -(-samples // 8)


def _check_scans(parsed: _Parsed) -> None:
    """Check every scan in file order (tables and restart interval as in effect at each): the tables
    it uses, its number of restart intervals and their RSTn sequence, its place in the progression, and
    that each interval holds at least the fewest bits its MCUs can be coded in. Whether the data decodes,
    exactly, is left to the strict decode in ``clean_cell_image``."""
    frame = parsed.frame
    assert frame is not None
    components = frame.components
    h_max = max(component.h for component in components)
    v_max = max(component.v for component in components)
    mcus_x = -(-frame.width // (8 * h_max))
    mcus_y = -(-frame.height // (8 * v_max))
    block_shape = [(_block_count(frame.width, c.h, h_max), _block_count(frame.height, c.v, v_max)) for c in components]
    quant: set[int] = set()
    huffman: dict[tuple[int, int], _HuffmanTable] = {}
    restart_interval = 0
    coefficient_bits = [[-1] * 64 for _ in components]  # progressive: the last Al of each coefficient
    scanned = [False] * len(components)

    def shortest(table_class: int, ident: int) -> int:
        table = huffman.get((table_class, ident))
        if table is None:
            raise _corrupt("scan uses a Huffman table that is not defined")
        return _shortest_code(table)

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
                total_mcus = width * height
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
            mcus = [min(per_interval, total_mcus - start) for start in range(0, total_mcus, per_interval)]

            # The fewest bits an MCU can take: exact for a DC refinement (one bit per block), a lower
            # bound otherwise (every block has a DC symbol and at least one AC symbol or end-of-band).
            exact = False
            if not frame.progressive:
                if (scan.ss, scan.se, scan.ah, scan.al) != (0, 63, 0, 0):
                    raise _corrupt("sequential scan with progressive parameters")
                for index, _, _ in scan.components:
                    if scanned[index]:
                        raise _corrupt("component appears in more than one scan")
                    scanned[index] = True
                bits_per_mcu = sum(
                    _blocks_in_mcu(scan, components, index) * (shortest(0, dc) + shortest(1, ac))
                    for index, dc, ac in scan.components
                )
            else:
                _check_progression(scan, coefficient_bits)
                if scan.ss == 0 and scan.ah:
                    exact = True
                    bits_per_mcu = sum(_blocks_in_mcu(scan, components, index) for index, _, _ in scan.components)
                elif scan.ss == 0:
                    bits_per_mcu = sum(
                        _blocks_in_mcu(scan, components, index) * shortest(0, dc) for index, dc, _ in scan.components
                    )
                else:
                    shortest(1, scan.components[0][2])
                    bits_per_mcu = 0  # an end-of-band run covers up to 32,767 blocks with a few bits
            for data, count in zip(scan.intervals, mcus, strict=False):
                if 8 * len(data) < count * bits_per_mcu:
                    raise _premature()
                if exact and len(data) > -(-count * bits_per_mcu // 8):
                    raise _extraneous()
                if not data:
                    raise _premature()  # every MCU takes at least one bit

    if frame.progressive:
        if any(bit != 0 for bits in coefficient_bits for bit in bits):
            raise _corrupt("progressive JPEG is missing scans (incomplete image)")
    elif not all(scanned):
        raise _corrupt("JPEG is missing the scan of a colour component")


def _blocks_in_mcu(scan: _Scan, components: tuple[_Component, ...], index: int) -> int:
    return 1 if len(scan.components) == 1 else components[index].h * components[index].v


def _check_progression(scan: _Scan, coefficient_bits: list[list[int]]) -> None:
    """Check one progressive scan's parameters and its place in the progression (``coefficient_bits``:
    for each component and coefficient, the Al of the last scan that coded it, -1 before the first)."""
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


# ---------------------------------------------------------------------------------------------------
# Writing the new stream


@dataclass(frozen=True)
class _ScanEnd:
    offset: int  # where the scan's entropy-coded data ends in the new stream
    last_byte: int  # bytes its last data byte takes there (2 for a stuffed 0xFF00)
    restarts: bool  # the scan has more than one restart interval
    probe: bool  # whether its last byte needs the decoder's proof (not for a DC refinement: exact size)


def _segment(marker: int, payload: bytes) -> bytes:
    return bytes((0xFF, marker)) + (len(payload) + 2).to_bytes(2, "big") + payload


def _serialise(parsed: _Parsed, scan_ends: list[_ScanEnd] | None = None) -> bytes:
    """The new stream; ``scan_ends`` gets where each scan's data ends in it (see ``_ScanEnd``)."""
    out = bytearray(b"\xff\xd8")
    if parsed.jfif is not None:
        minor, units, x_density, y_density = parsed.jfif
        jfif = b"JFIF\x00" + bytes((1, minor, units)) + x_density.to_bytes(2, "big") + y_density.to_bytes(2, "big")
        out += _segment(APP0, jfif + b"\x00\x00")
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
            if scan_ends is not None:
                refinement = parsed.frame.progressive and scan.ss == 0 and scan.ah > 0  # type: ignore[union-attr]
                last_byte = 2 if scan.intervals[-1][-1:] == b"\xff" else 1
                scan_ends.append(_ScanEnd(len(out), last_byte, len(scan.intervals) > 1, not refinement))
    out += b"\xff\xd9"
    return bytes(out)


def _rebuild(data: bytes, max_pixels: int, scan_ends: list[_ScanEnd] | None = None) -> tuple[bytes, _Frame]:
    parsed = _parse(data, max_pixels)
    _check_scans(parsed)
    assert parsed.frame is not None
    return _serialise(parsed, scan_ends), parsed.frame


def strip_jpeg_metadata(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """The JPEG rebuilt from its parsed decoding segments and its entropy-coded data as parsed (see the
    module docstring); raises ``ImageRejected``. Structure only: it does not decode, so it does not
    prove the data complete or free of extraneous bytes (``clean_cell_image`` does)."""
    return _rebuild(data, max_pixels)[0]


# ---------------------------------------------------------------------------------------------------
# Decoding: libjpeg-turbo with every warning an error

_COLORSPACE = {1: "GRAY", 3: "RGB", 4: "CMYK"}  # libjpeg converts YCbCr, and YCCK to CMYK, itself
_PREMATURE_END = "premature end"  # libjpeg's JWRN_HIT_MARKER: the decoder needed bits past the data


def _decode_failure(message: str) -> ImageRejected:
    """A fixed reason for a decoder error (its message is classified, never passed on)."""
    if _PREMATURE_END in message:
        return _premature()
    if "extraneous bytes" in message:
        return _extraneous()
    if "Huffman" in message:
        return _bad_code()
    return _corrupt("JPEG does not decode")


def _strict_decode(jpeg: bytes, colorspace: str, **scale: int) -> np.ndarray:
    try:
        return simplejpeg.decode_jpeg(jpeg, colorspace=colorspace, strict=True, **scale)
    except (ValueError, RuntimeError) as error:
        raise _decode_failure(str(error)) from None
    except MemoryError:
        raise _corrupt("JPEG does not decode") from None


def _check_every_byte_read(rebuilt: bytes, colorspace: str, scan_ends: list[_ScanEnd]) -> None:
    """Prove that no restart interval has whole bytes after its last MCU. libjpeg's strict decode sees
    only some: its bit buffer reads up to 7 bytes ahead; what is left in it at an RSTn is added to a
    count of skipped bytes that is reported only when libjpeg next searches for a marker (it does not
    when the buffer has already reached the marker), and what is left at the end of a scan is dropped.
    Two kinds of decode at 1/8 DCT scale (which still decodes every Huffman code) close that:

    - with an empty COM segment after each scan's data, where libjpeg searches for the next marker and
      so reports the bytes left before every RSTn of that scan (only for scans with restart intervals);
    - for each scan, without the last byte of its last interval, which must then run out of data."""
    scale = {"min_height": 1, "min_width": 1, "min_factor": 8}
    if any(end.restarts for end in scan_ends):
        pieces, start = [], 0
        for end in scan_ends:
            pieces += [rebuilt[start : end.offset], b"\xff\xfe\x00\x02"]
            start = end.offset
        _strict_decode(b"".join(pieces) + rebuilt[start:], colorspace, **scale)
    for end in scan_ends:
        if not end.probe:
            continue
        shortened = rebuilt[: end.offset - end.last_byte] + rebuilt[end.offset :]
        try:
            simplejpeg.decode_jpeg(shortened, colorspace=colorspace, strict=True, **scale)
        except (ValueError, RuntimeError) as error:
            if _PREMATURE_END in str(error):
                continue
            raise _decode_failure(str(error)) from None
        except MemoryError:
            raise _corrupt("JPEG does not decode") from None
        raise _extraneous()


def clean_cell_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> CleanImage:
    """Rebuild the JPEG without metadata, then decode it in full with every decoder warning an error
    and prove each scan's data used to its last byte: a truncated, corrupt or oversized file is rejected
    here, not when a model later trips over it."""
    if not data:
        raise ImageRejected(NOT_AN_IMAGE, "empty file")
    scan_ends: list[_ScanEnd] = []
    rebuilt, frame = _rebuild(data, max_pixels, scan_ends)
    # Pillow decodes these files later (training, classify): its decompression-bomb guard (a warning
    # above MAX_IMAGE_PIXELS, an error above twice that) is honoured here, before the decode.
    limit = Image.MAX_IMAGE_PIXELS
    if limit and frame.width * frame.height > limit:
        raise ImageRejected(IMAGE_TOO_LARGE, "image exceeds the decoder's decompression-bomb limit")
    colorspace = _COLORSPACE[len(frame.components)]
    decoded = _strict_decode(rebuilt, colorspace)
    if decoded.shape[:2] != (frame.height, frame.width):
        raise _corrupt("decoded size differs from the frame header")
    _check_every_byte_read(rebuilt, colorspace, scan_ends)
    return CleanImage(jpeg=rebuilt, width=frame.width, height=frame.height)
