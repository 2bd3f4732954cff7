"""Synthetic May-Grünwald-Giemsa cell images: one cell of a class on a field of red cells, as a CellaVision
DM96 saves it (``draw_cell``). Deterministic for a given random generator.

Sizes are in pixels at the scale of PBC's DM96 images: a red cell is ~55 px across, a neutrophil
~110-130 px, a small lymphocyte ~80-90 px, a platelet ~15-25 px. Each cell is painted on its own
transparent patch around the patch centre, then rotated and pasted onto the field with some jitter.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from hema_pipeline.taxonomy import (
    BASOPHIL,
    CELL_CLASSES,
    EOSINOPHIL,
    ERYTHROBLAST,
    HYPOGRANULATED_NEUTROPHIL,
    IMMATURE_GRANULOCYTE,
    LYMPHOCYTE,
    MALIGNANT_LYMPHOCYTE,
    MONOCYTE,
    NEUTROPHIL,
    PLATELET,
)

# What a CellaVision DM96 saves: 360 x 363 px RGB JPEG (width x height, as PIL reports it).
CELL_IMAGE_SIZE: tuple[int, int] = (360, 363)

RGB = tuple[int, int, int]
Painter = Callable[[ImageDraw.ImageDraw, np.random.Generator, float], None]

_PATCH_SIZE = 220
_OUTLINE_ANGLES = np.linspace(0.0, 2.0 * np.pi, 48, endpoint=False)
_ANGLE_STEP = 2.0 * np.pi / len(_OUTLINE_ANGLES)

# May-Grünwald-Giemsa colours, before per-cell and per-image variation.
BACKGROUND: RGB = (246, 228, 206)
RED_CELL: RGB = (214, 180, 184)
RED_CELL_PALLOR: RGB = (232, 212, 206)
NUCLEUS: RGB = (88, 40, 118)
NUCLEUS_CLUMP: RGB = (58, 22, 88)
NEUTROPHIL_CYTOPLASM: RGB = (226, 196, 206)
NEUTROPHIL_GRANULE: RGB = (192, 144, 180)
HYPOGRANULAR_CYTOPLASM: RGB = (238, 228, 232)
EOSINOPHIL_CYTOPLASM: RGB = (232, 170, 150)
EOSINOPHIL_GRANULE: RGB = (218, 104, 72)
BASOPHIL_CYTOPLASM: RGB = (196, 166, 206)
BASOPHIL_NUCLEUS: RGB = (112, 62, 142)
BASOPHIL_GRANULE: RGB = (58, 18, 78)
LYMPHOCYTE_CYTOPLASM: RGB = (158, 176, 222)
LYMPHOCYTE_NUCLEUS: RGB = (72, 36, 110)
BLAST_CYTOPLASM: RGB = (72, 98, 180)
BLAST_NUCLEUS: RGB = (132, 92, 172)
BLAST_CHROMATIN: RGB = (108, 70, 150)
NUCLEOLUS: RGB = (172, 164, 216)
MONOCYTE_CYTOPLASM: RGB = (180, 178, 208)
MONOCYTE_NUCLEUS: RGB = (128, 88, 160)
VACUOLE: RGB = (234, 230, 238)
IG_CYTOPLASM: RGB = (168, 152, 208)
IG_NUCLEUS: RGB = (104, 58, 146)
IG_GRANULE: RGB = (178, 100, 162)
ERYTHROBLAST_CYTOPLASM: RGB = (178, 154, 198)
ERYTHROBLAST_NUCLEUS: RGB = (46, 18, 64)
ERYTHROBLAST_CHROMATIN: RGB = (28, 8, 40)
PLATELET_BODY: RGB = (176, 136, 200)
PLATELET_GRANULE: RGB = (104, 52, 132)


def _tint(colour: RGB, rng: np.random.Generator, spread: float = 8.0) -> RGB:
    """A colour near ``colour``: no two cells take up the stain identically."""
    red, green, blue = (int(np.clip(channel + rng.normal(0.0, spread), 0, 255)) for channel in colour)
    return red, green, blue


def _polar(x: float, y: float, distance: float, direction: float) -> tuple[float, float]:
    return x + distance * np.cos(direction), y + distance * np.sin(direction)


@dataclass(frozen=True, eq=False)
class _Outline:
    """A star-shaped closed outline: its radius at each of ``_OUTLINE_ANGLES`` around a centre."""

    x: float
    y: float
    radii: np.ndarray

    def points(self) -> list[tuple[float, float]]:
        xs = self.x + self.radii * np.cos(_OUTLINE_ANGLES)
        ys = self.y + self.radii * np.sin(_OUTLINE_ANGLES)
        return list(zip(xs.tolist(), ys.tolist(), strict=True))

    def sample(self, rng: np.random.Generator, count: int, depth: float = 0.9) -> np.ndarray:
        """``count`` points spread uniformly over the area within ``depth`` of the outline, as (n, 2)."""
        index = rng.integers(0, len(_OUTLINE_ANGLES), count)
        theta = _OUTLINE_ANGLES[index] + rng.uniform(-_ANGLE_STEP / 2, _ANGLE_STEP / 2, count)
        rho = np.sqrt(rng.uniform(0.0, 1.0, count)) * self.radii[index] * depth
        return np.column_stack([self.x + rho * np.cos(theta), self.y + rho * np.sin(theta)])


def _outline(
    x: float,
    y: float,
    radius: float,
    rng: np.random.Generator,
    *,
    elongation: float = 0.0,
    axis: float = 0.0,
    wobble: float = 0.03,
    indent: float = 0.0,
    indent_at: float = 0.0,
    indent_width: float = 0.5,
) -> _Outline:
    """A round outline made oval by ``elongation`` along ``axis``, irregular by ``wobble`` (smooth low
    harmonics, like a real membrane) and kidney-shaped by an ``indent`` of that depth at ``indent_at``."""
    theta = _OUTLINE_ANGLES
    radii = radius * (1.0 + elongation * np.cos(2.0 * (theta - axis)))
    for harmonic in (3, 4, 5):
        amplitude = rng.normal(0.0, wobble * 3.0 / harmonic)  # higher harmonics weaker: no polygonal look
        radii = radii * (1.0 + amplitude * np.cos(harmonic * theta + rng.uniform(0, 2 * np.pi)))
    if indent:
        distance = np.angle(np.exp(1j * (theta - indent_at)))
        radii = radii * (1.0 - indent * np.exp(-((distance / indent_width) ** 2)))
    return _Outline(x, y, radii)


def _fill(draw: ImageDraw.ImageDraw, outline: _Outline, colour: RGB) -> None:
    draw.polygon(outline.points(), fill=colour)


def _speckle(
    draw: ImageDraw.ImageDraw,
    points: np.ndarray,
    radius: tuple[float, float],
    colour: RGB,
    rng: np.random.Generator,
    spread: float = 10.0,
) -> None:
    """Granules or chromatin clumps: small discs of random size and shade at ``points``."""
    sizes = rng.uniform(*radius, len(points))
    shades = np.clip(np.asarray(colour) + rng.normal(0.0, spread, (len(points), 1)), 0, 255).astype(int)
    for (x, y), size, shade in zip(points.tolist(), sizes.tolist(), shades.tolist(), strict=True):
        draw.ellipse((x - size, y - size, x + size, y + size), fill=tuple(shade))


def _chromatin(
    draw: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    parts: Sequence[_Outline],
    per_part: int,
    radius: tuple[float, float],
    colour: RGB,
) -> None:
    for part in parts:
        _speckle(draw, part.sample(rng, per_part, depth=0.8), radius, colour, rng, spread=8.0)


def _cell_body(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, centre: float, radius: float, colour: RGB, wobble: float = 0.03
) -> _Outline:
    elongation, axis = rng.uniform(0.0, 0.06), rng.uniform(0, np.pi)
    body = _outline(centre, centre, radius, rng, elongation=elongation, axis=axis, wobble=wobble)
    _fill(draw, body, _tint(colour, rng))
    return body


def _nucleus_room(body: _Outline) -> float:
    """How far from the centre a lobed nucleus may reach and still leave a rim of cytoplasm."""
    return 0.85 * float(body.radii.min())


def _segmented_nucleus(
    draw: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    centre: float,
    lobes: int,
    lobe_radius: float,
    room: float,
    colour: RGB,
) -> list[_Outline]:
    """``lobes`` lobes joined by thin chromatin strands, laid out as a chain that turns irregularly (C, S
    and clustered shapes all occur) and is kept within ``room`` of the cell centre."""
    heading = rng.uniform(0, 2 * np.pi)
    turn = rng.choice((-1.0, 1.0))
    centres = [np.zeros(2)]
    for _ in range(lobes - 1):
        if rng.uniform() < 0.25:
            turn = -turn
        heading += turn * rng.uniform(0.4, 1.1)
        step = lobe_radius * rng.uniform(2.0, 2.5)
        centres.append(centres[-1] + step * np.array([np.cos(heading), np.sin(heading)]))
    chain = np.array(centres) - np.mean(centres, axis=0)
    reach = float(np.max(np.hypot(chain[:, 0], chain[:, 1])))
    if reach + lobe_radius > room:
        chain *= max(room - lobe_radius, 0.0) / reach
    chain += centre
    strand_width = max(3, round(lobe_radius * 0.3))
    for (x0, y0), (x1, y1) in zip(chain[:-1].tolist(), chain[1:].tolist(), strict=True):
        draw.line((x0, y0, x1, y1), fill=colour, width=strand_width)
    outlines = [
        _outline(x, y, lobe_radius * rng.uniform(0.85, 1.1), rng, elongation=0.15, axis=rng.uniform(0, np.pi), wobble=0.05)
        for x, y in chain.tolist()
    ]
    for lobe in outlines:
        _fill(draw, lobe, colour)
    return outlines


def _band_nucleus(draw: ImageDraw.ImageDraw, rng: np.random.Generator, centre: float, colour: RGB) -> list[_Outline]:
    """A band (stab) neutrophil: one thick, evenly wide C- or U-shaped nucleus."""
    arc_radius = rng.uniform(26, 34)
    sweep = rng.uniform(0.9, 1.4) * np.pi
    direction = rng.uniform(0, 2 * np.pi)
    thickness = rng.uniform(8.5, 11.0)
    angles = direction + np.linspace(-sweep / 2, sweep / 2, 14)
    outlines = [_outline(*_polar(centre, centre, arc_radius, a), thickness, rng, wobble=0.02) for a in angles]
    for part in outlines:
        _fill(draw, part, colour)
    return outlines


def _paint_neutrophil(draw: ImageDraw.ImageDraw, rng: np.random.Generator, centre: float) -> None:
    body = _cell_body(draw, rng, centre, rng.uniform(54, 64), NEUTROPHIL_CYTOPLASM)
    _speckle(draw, body.sample(rng, 260), (0.8, 1.5), NEUTROPHIL_GRANULE, rng)
    nucleus_colour = _tint(NUCLEUS, rng)
    if rng.uniform() < 0.2:
        lobes = _band_nucleus(draw, rng, centre, nucleus_colour)
    else:
        lobe_count, lobe_radius = int(rng.integers(3, 6)), rng.uniform(12, 15)
        lobes = _segmented_nucleus(draw, rng, centre, lobe_count, lobe_radius, _nucleus_room(body), nucleus_colour)
    _chromatin(draw, rng, lobes, 6, (1.5, 3.0), NUCLEUS_CLUMP)


def _paint_hypogranulated_neutrophil(draw: ImageDraw.ImageDraw, rng: np.random.Generator, centre: float) -> None:
    body = _cell_body(draw, rng, centre, rng.uniform(52, 62), HYPOGRANULAR_CYTOPLASM)
    _speckle(draw, body.sample(rng, int(rng.integers(0, 25))), (0.8, 1.4), NEUTROPHIL_GRANULE, rng)
    nucleus_colour = _tint(NUCLEUS, rng)
    if rng.uniform() < 0.4:
        # Pseudo-Pelger: two lobes ("spectacles") or one round-to-peanut nucleus, coarsely clumped.
        lobe_count = int(rng.integers(1, 3))
        lobe_radius = rng.uniform(16, 20) if lobe_count == 2 else rng.uniform(21, 26)
    else:
        lobe_count, lobe_radius = int(rng.integers(2, 5)), rng.uniform(12, 15)
    lobes = _segmented_nucleus(draw, rng, centre, lobe_count, lobe_radius, _nucleus_room(body), nucleus_colour)
    _chromatin(draw, rng, lobes, 9, (2.0, 3.5), NUCLEUS_CLUMP)


def _paint_eosinophil(draw: ImageDraw.ImageDraw, rng: np.random.Generator, centre: float) -> None:
    body = _cell_body(draw, rng, centre, rng.uniform(56, 66), EOSINOPHIL_CYTOPLASM)
    # Coarse, refractile granules pack the cytoplasm; the bilobed nucleus stays visible on top.
    granules = body.sample(rng, int(rng.integers(240, 320)), depth=0.95)
    _speckle(draw, granules, (2.0, 3.2), _tint(EOSINOPHIL_GRANULE, rng), rng, spread=14.0)
    lobe_radius = rng.uniform(16, 20)
    lobes = _segmented_nucleus(draw, rng, centre, 2, lobe_radius, _nucleus_room(body), _tint(NUCLEUS, rng))
    _chromatin(draw, rng, lobes, 6, (1.5, 3.0), NUCLEUS_CLUMP)


def _paint_basophil(draw: ImageDraw.ImageDraw, rng: np.random.Generator, centre: float) -> None:
    body = _cell_body(draw, rng, centre, rng.uniform(48, 58), BASOPHIL_CYTOPLASM)
    lobe_count, lobe_radius = int(rng.integers(2, 4)), rng.uniform(14, 18)
    nucleus_colour = _tint(BASOPHIL_NUCLEUS, rng)
    lobes = _segmented_nucleus(draw, rng, centre, lobe_count, lobe_radius, _nucleus_room(body), nucleus_colour)
    # Large dark granules lie over the nucleus as well as the cytoplasm and largely hide its shape.
    granules = body.sample(rng, int(rng.integers(110, 190)), depth=0.95)
    _speckle(draw, granules, (2.2, 4.2), BASOPHIL_GRANULE, rng, spread=14.0)
    _chromatin(draw, rng, lobes, 10, (2.5, 4.0), BASOPHIL_GRANULE)


def _paint_lymphocyte(draw: ImageDraw.ImageDraw, rng: np.random.Generator, centre: float) -> None:
    large = rng.uniform() < 0.2
    radius = rng.uniform(48, 56) if large else rng.uniform(38, 46)
    body = _cell_body(draw, rng, centre, radius, LYMPHOCYTE_CYTOPLASM, wobble=0.025)
    # Small lymphocytes are nearly all nucleus; the thin blue rim is often eccentric.
    nucleus_radius = radius * (rng.uniform(0.7, 0.8) if large else rng.uniform(0.82, 0.9))
    offset = (radius - nucleus_radius) * rng.uniform(0.2, 0.8)
    nucleus = _outline(
        *_polar(body.x, body.y, offset, rng.uniform(0, 2 * np.pi)),
        nucleus_radius,
        rng,
        elongation=rng.uniform(0.0, 0.06),
        axis=rng.uniform(0, np.pi),
        indent=rng.uniform(0.0, 0.08),
        indent_at=rng.uniform(0, 2 * np.pi),
    )
    _fill(draw, nucleus, _tint(LYMPHOCYTE_NUCLEUS, rng))
    _chromatin(draw, rng, [nucleus], 40, (2.0, 4.0), NUCLEUS_CLUMP)


def _paint_malignant_lymphocyte(draw: ImageDraw.ImageDraw, rng: np.random.Generator, centre: float) -> None:
    radius = rng.uniform(56, 70)
    body = _cell_body(draw, rng, centre, radius, BLAST_CYTOPLASM, wobble=0.04)
    # A high nucleus/cytoplasm ratio, sometimes a cleft; the cytoplasm a deep blue rim.
    nucleus = _outline(
        body.x,
        body.y,
        radius * rng.uniform(0.8, 0.88),
        rng,
        elongation=rng.uniform(0.0, 0.1),
        axis=rng.uniform(0, np.pi),
        wobble=0.05,
        indent=rng.uniform(0.0, 0.2),
        indent_at=rng.uniform(0, 2 * np.pi),
        indent_width=0.3,
    )
    _fill(draw, nucleus, _tint(BLAST_NUCLEUS, rng))
    # Fine, open ("sieve-like") chromatin: many tiny specks rather than a few clumps; pale nucleoli.
    _speckle(draw, nucleus.sample(rng, 220, depth=0.92), (0.8, 1.6), BLAST_CHROMATIN, rng, spread=6.0)
    nucleoli = nucleus.sample(rng, int(rng.integers(1, 4)), depth=0.55)
    _speckle(draw, nucleoli, (5.0, 8.0), _tint(NUCLEOLUS, rng), rng, spread=4.0)


def _paint_monocyte(draw: ImageDraw.ImageDraw, rng: np.random.Generator, centre: float) -> None:
    radius = rng.uniform(62, 78)
    body = _cell_body(draw, rng, centre, radius, MONOCYTE_CYTOPLASM, wobble=0.06)
    _speckle(draw, body.sample(rng, 60), (0.6, 1.1), NEUTROPHIL_GRANULE, rng)
    _speckle(draw, body.sample(rng, int(rng.integers(3, 11)), depth=0.85), (2.5, 6.5), VACUOLE, rng, spread=4.0)
    # Kidney- or horseshoe-shaped, folded nucleus with lacy chromatin.
    nucleus = _outline(
        body.x,
        body.y,
        radius * rng.uniform(0.58, 0.68),
        rng,
        elongation=rng.uniform(0.08, 0.2),
        axis=rng.uniform(0, np.pi),
        wobble=0.06,
        indent=rng.uniform(0.3, 0.55),
        indent_at=rng.uniform(0, 2 * np.pi),
        indent_width=rng.uniform(0.4, 0.7),
    )
    _fill(draw, nucleus, _tint(MONOCYTE_NUCLEUS, rng))
    _speckle(draw, nucleus.sample(rng, 70, depth=0.85), (1.2, 2.5), NUCLEUS, rng, spread=8.0)


def _paint_immature_granulocyte(draw: ImageDraw.ImageDraw, rng: np.random.Generator, centre: float) -> None:
    radius = rng.uniform(58, 72)
    body = _cell_body(draw, rng, centre, radius, IG_CYTOPLASM, wobble=0.03)
    _speckle(draw, body.sample(rng, 150), (0.8, 1.5), IG_GRANULE, rng)
    # Myelocytes have a round-to-oval eccentric nucleus; metamyelocytes an indented, bean-shaped one.
    direction = rng.uniform(0, 2 * np.pi)
    nucleus_radius = radius * rng.uniform(0.5, 0.62)
    offset = (radius - nucleus_radius) * rng.uniform(0.45, 0.8)
    nucleus = _outline(
        *_polar(body.x, body.y, offset, direction),
        nucleus_radius,
        rng,
        elongation=rng.uniform(0.05, 0.18),
        axis=direction + np.pi / 2,
        wobble=0.03,
        indent=rng.uniform(0.2, 0.35) if rng.uniform() < 0.35 else 0.0,
        indent_at=direction + np.pi,
        indent_width=0.45,
    )
    _fill(draw, nucleus, _tint(IG_NUCLEUS, rng))
    _speckle(draw, nucleus.sample(rng, 60, depth=0.85), (1.0, 2.2), NUCLEUS, rng, spread=8.0)


def _paint_erythroblast(draw: ImageDraw.ImageDraw, rng: np.random.Generator, centre: float) -> None:
    radius = rng.uniform(34, 44)
    body = _cell_body(draw, rng, centre, radius, ERYTHROBLAST_CYTOPLASM, wobble=0.02)
    nucleus_radius = radius * rng.uniform(0.5, 0.64)
    offset = (radius - nucleus_radius) * rng.uniform(0.0, 0.6)
    nucleus = _outline(*_polar(body.x, body.y, offset, rng.uniform(0, 2 * np.pi)), nucleus_radius, rng, wobble=0.015)
    # Pyknotic: very dense, nearly black, with hardly any visible structure.
    _fill(draw, nucleus, _tint(ERYTHROBLAST_NUCLEUS, rng, spread=5.0))
    _chromatin(draw, rng, [nucleus], 12, (1.5, 3.0), ERYTHROBLAST_CHROMATIN)


def _paint_platelets(draw: ImageDraw.ImageDraw, rng: np.random.Generator, centre: float) -> None:
    # No large cell: one to four small purple fragments (a platelet or a small clump) near the centre.
    for _ in range(int(rng.integers(1, 5))):
        fragment = _outline(
            *_polar(centre, centre, rng.uniform(0, 26), rng.uniform(0, 2 * np.pi)),
            rng.uniform(7, 13),
            rng,
            elongation=rng.uniform(0.0, 0.25),
            axis=rng.uniform(0, np.pi),
            wobble=0.1,
        )
        _fill(draw, fragment, _tint(PLATELET_BODY, rng))
        _speckle(draw, fragment.sample(rng, int(rng.integers(6, 14)), depth=0.7), (1.0, 2.0), PLATELET_GRANULE, rng)


_CELL_PAINTERS: Mapping[str, Painter] = {
    NEUTROPHIL: _paint_neutrophil,
    HYPOGRANULATED_NEUTROPHIL: _paint_hypogranulated_neutrophil,
    EOSINOPHIL: _paint_eosinophil,
    BASOPHIL: _paint_basophil,
    LYMPHOCYTE: _paint_lymphocyte,
    MALIGNANT_LYMPHOCYTE: _paint_malignant_lymphocyte,
    MONOCYTE: _paint_monocyte,
    IMMATURE_GRANULOCYTE: _paint_immature_granulocyte,
    ERYTHROBLAST: _paint_erythroblast,
    PLATELET: _paint_platelets,
}


def _paint_field(image: Image.Image, rng: np.random.Generator) -> None:
    """Red cells (pale discs with central pallor) and the odd stray platelet, as around any imaged cell."""
    draw = ImageDraw.Draw(image)
    width, height = image.size
    red_cell = _tint(RED_CELL, rng, spread=6.0)
    pallor = _tint(RED_CELL_PALLOR, rng, spread=4.0)
    rim = tuple(max(0, channel - 14) for channel in red_cell)
    for _ in range(int(rng.integers(12, 26))):
        x, y = rng.uniform(-20, width + 20), rng.uniform(-20, height + 20)
        rx = rng.uniform(24, 31)
        ry = rx * rng.uniform(0.85, 1.0)
        draw.ellipse((x - rx, y - ry, x + rx, y + ry), fill=red_cell, outline=rim, width=2)
        inner = rng.uniform(0.35, 0.55)
        draw.ellipse((x - rx * inner, y - ry * inner, x + rx * inner, y + ry * inner), fill=pallor)
    for _ in range(int(rng.poisson(0.6))):
        x, y, radius = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(3, 6)
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=_tint(PLATELET_BODY, rng))


def draw_cell(cell_class: str, rng: np.random.Generator, size: tuple[int, int] = CELL_IMAGE_SIZE) -> Image.Image:
    """A procedurally drawn RGB image of one ``cell_class`` cell (one of ``CELL_CLASSES``) at DM96 scale;
    ``size`` = (width, height) of the field around it (a smaller size crops). All randomness comes from
    ``rng``, so the same generator state gives the same image."""
    painter = _CELL_PAINTERS.get(cell_class)
    if painter is None:
        raise ValueError(f"unknown cell class {cell_class!r}; expected one of {', '.join(CELL_CLASSES)}")
    width, height = size
    field = Image.new("RGB", size, _tint(BACKGROUND, rng, spread=3.0))
    _paint_field(field, rng)

    patch = Image.new("RGBA", (_PATCH_SIZE, _PATCH_SIZE), (0, 0, 0, 0))
    painter(ImageDraw.Draw(patch), rng, _PATCH_SIZE / 2)
    patch = patch.rotate(float(rng.uniform(0, 360)), resample=Image.Resampling.BILINEAR)
    # Cells of one class differ in size and roundness; without this, two small round cells drawn on
    # similar fields come out closer than real distinct cells ever are (by perceptual hash).
    stretched = (round(_PATCH_SIZE * rng.uniform(0.88, 1.12)), round(_PATCH_SIZE * rng.uniform(0.88, 1.12)))
    patch = patch.resize(stretched, Image.Resampling.BILINEAR)
    # The analyser centres the cell it found, imperfectly.
    jitter_x, jitter_y = rng.normal(0.0, 8.0, 2).clip(-22, 22)
    corner = (round((width - patch.width) / 2 + jitter_x), round((height - patch.height) / 2 + jitter_y))
    field.paste(patch, corner, patch)

    # Focus differs from cell to cell. (A single box pass: a third of the cost of GaussianBlur, and the
    # kernel shape does not matter at this radius.)
    field = field.filter(ImageFilter.BoxBlur(float(rng.uniform(0.5, 1.6))))
    # Stain and illumination differ between smears and staining runs: a gain and offset per channel,
    # applied as a lookup table (much cheaper than float arithmetic on every pixel).
    gains = rng.normal(1.0, 0.015, 3)
    offsets = rng.normal(0.0, 2.5, 3)
    ramp = np.arange(256)
    lookup = np.concatenate([np.clip(ramp * gain + offset, 0, 255) for gain, offset in zip(gains, offsets, strict=True)])
    field = field.point(lookup.round().astype(int).tolist())
    # Camera noise, mostly in luminance.
    sigma = np.float32(rng.uniform(1.5, 4.0))
    pixels = np.asarray(field, dtype=np.int16)
    pixels += (rng.standard_normal((height, width, 1), dtype=np.float32) * sigma).astype(np.int16)
    np.clip(pixels, 0, 255, out=pixels)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")
