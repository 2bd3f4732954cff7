"""Cell images: check that a file is a complete JPEG and strip every metadata segment losslessly.

Stripping works on the JPEG marker structure, so the pixels are never re-encoded (re-encoding would
change what a model sees between the analyser and the pipeline). Kept: the segments needed to decode
(quantisation and Huffman tables, frame and scan headers, restart interval, the JFIF and Adobe colour
headers) and the entropy-coded data. Dropped: EXIF/XMP (APP1), ICC and other APPn blocks, comments (COM)
and anything after the end-of-image marker, i.e. every place a writer can put text.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

SOI, EOI, SOS = 0xD8, 0xD9, 0xDA
APP0, APP14, COM = 0xE0, 0xEE, 0xFE
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM and RSTn carry no length
_KEPT_APP = {APP0, APP14}


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


def strip_jpeg_metadata(data: bytes) -> bytes:
    if data[:2] != b"\xff\xd8":
        raise ImageRejected("not_an_image", "not a JPEG file (no start-of-image marker)")
    out = bytearray(b"\xff\xd8")
    position = 2
    length = len(data)
    while True:
        # Skip fill bytes between segments.
        while position < length and data[position] == 0xFF and position + 1 < length and data[position + 1] == 0xFF:
            position += 1
        if position + 1 >= length or data[position] != 0xFF:
            raise ImageRejected("corrupt_image", "JPEG structure broken or truncated before end-of-image")
        marker = data[position + 1]
        if marker == EOI:
            out += b"\xff\xd9"
            return bytes(out)
        if marker in _STANDALONE:
            out += data[position : position + 2]
            position += 2
            continue
        if position + 4 > length:
            raise ImageRejected("corrupt_image", "JPEG truncated inside a segment header")
        segment_length = int.from_bytes(data[position + 2 : position + 4], "big")
        segment_end = position + 2 + segment_length
        if segment_length < 2 or segment_end > length:
            raise ImageRejected("corrupt_image", "JPEG truncated inside a segment")
        keep = not (0xE0 <= marker <= 0xEF and marker not in _KEPT_APP) and marker != COM
        if keep:
            out += data[position:segment_end]
        position = segment_end
        if marker == SOS:
            # Entropy-coded data runs to the next marker that is neither a stuffed 0xFF00 nor a restart.
            scan = position
            while True:
                scan = data.find(b"\xff", scan)
                if scan < 0 or scan + 1 >= length:
                    raise ImageRejected("corrupt_image", "JPEG truncated: scan data has no end-of-image marker")
                following = data[scan + 1]
                if following == 0x00 or 0xD0 <= following <= 0xD7 or following == 0xFF:
                    scan += 1 if following == 0xFF else 2
                    continue
                break
            out += data[position:scan]
            position = scan


def clean_cell_image(data: bytes) -> CleanImage:
    """Strip metadata, then decode the result: a truncated or corrupt file is rejected here, not when a
    model later trips over it.

    The decode runs at 1/8 DCT scale (``draft``): libjpeg still Huffman-decodes every coefficient of the
    entropy-coded data, which is where truncation and corruption show, but skips the full-size inverse
    DCT and colour conversion, about three times faster. The frame size is read from the header."""
    if not data:
        raise ImageRejected("not_an_image", "empty file")
    stripped = strip_jpeg_metadata(data)
    try:
        with Image.open(io.BytesIO(stripped)) as image:
            if image.format != "JPEG":
                raise ImageRejected("not_an_image", f"not a JPEG image ({image.format})")
            width, height = image.size
            image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
            image.load()
            if image.mode not in ("RGB", "L", "YCbCr", "CMYK"):
                raise ImageRejected("corrupt_image", f"unsupported JPEG colour mode {image.mode}")
    except ImageRejected:
        raise
    except UnidentifiedImageError:
        raise ImageRejected("not_an_image", "not a readable image") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageRejected("corrupt_image", f"JPEG does not decode ({error})") from None
    return CleanImage(jpeg=stripped, width=width, height=height)
