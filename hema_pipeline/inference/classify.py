"""The core of ``hema classify``: classify image files with one model and write a CSV, one row per image.

Unreadable files are reported (file and reason) and skipped, and returned, so the command can exit
non-zero when any failed while still writing the rows of every file that could be classified. A file
whose header declares more than ``HEMA_MAX_IMAGE_PIXELS`` pixels (``settings.max_image_pixels``), or
whose header cannot be read, is one of them: it is refused before anything decodes it.
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from struct import error as struct_error
from typing import TextIO

import pandas as pd
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from hema_pipeline import settings
from hema_pipeline.inference.predict import (
    DEFAULT_BATCH_SIZE,
    CellClassifier,
    UnreadableImage,
    predict_readable_images,
    probabilities_wide,
)

IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png"})
PROBABILITY_PREFIX = "p_"


@dataclass(frozen=True)
class ClassifyOutcome:
    classified: int
    failures: tuple[UnreadableImage, ...]  # cell_key is the file as given

    @property
    def ok(self) -> bool:
        return not self.failures


def collect_image_files(
    files: Sequence[str | os.PathLike[str]] = (),
    directories: Sequence[str | os.PathLike[str]] = (),
    recursive: bool = False,
) -> list[Path]:
    """The files to classify: each ``-f`` file as given (whatever its suffix: a file named explicitly is
    tried, and reported if it cannot be read), then the JPEG and PNG files of each ``-d`` directory in
    name order (subdirectories too when ``recursive``). A file listed twice is classified once."""
    collected: list[Path] = [Path(file) for file in files]
    for directory in map(Path, directories):
        if not directory.is_dir():
            raise NotADirectoryError(f"{directory}: not a directory")
        candidates = directory.rglob("*") if recursive else directory.iterdir()
        collected.extend(sorted(path for path in candidates if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES))
    seen: set[Path] = set()
    unique = []
    for path in collected:
        resolved = path.resolve()
        if resolved not in seen:
            seen.add(resolved)
            unique.append(path)
    return unique


def classification_table(predictions: pd.DataFrame, class_names: Sequence[str]) -> pd.DataFrame:
    """The CSV's columns: file, predicted_class, confidence, referred, referral_reason, p_<class>..."""
    table = pd.DataFrame(
        {
            "file": predictions["cell_key"],
            "predicted_class": predictions["predicted_class"],
            "confidence": predictions["confidence"],
            "referred": ~predictions["accepted"].astype(bool),
            "referral_reason": predictions["referral_reason"],
        }
    )
    return pd.concat([table, probabilities_wide(predictions, class_names, PROBABILITY_PREFIX)], axis=1)


def header_refusal(path: str | os.PathLike[str], max_pixels: int) -> str | None:
    """Why ``path`` must not be decoded, from its header alone (``Image.open`` reads no pixel data):
    more than ``max_pixels`` declared, or a header that does not parse; None when it may be decoded."""
    too_large = f"image declares more than {max_pixels} pixels (HEMA_MAX_IMAGE_PIXELS); not decoded"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
    except Image.DecompressionBombError:
        return too_large
    except UnidentifiedImageError:
        return "not a readable image (its header does not parse)"
    except OSError as error:
        return error.strerror or "image header cannot be read"
    except (SyntaxError, ValueError, EOFError, IndexError, struct_error):
        return "not a readable image (its header does not parse)"
    return too_large if width * height > max_pixels else None


def classify_files(
    paths: Sequence[str | os.PathLike[str]],
    classifier: CellClassifier,
    output: str | os.PathLike[str] | TextIO,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
    messages: TextIO = sys.stderr,
    max_pixels: int | None = None,
) -> ClassifyOutcome:
    """Classify ``paths`` and write the CSV to ``output`` (a path, written atomically, or an open text
    stream). A tqdm bar and one line per unreadable file go to ``messages``. Files over ``max_pixels``
    (default ``settings.max_image_pixels()``) are refused from their header, before any decode."""
    files = [os.fspath(path) for path in paths]
    limit = settings.max_image_pixels() if max_pixels is None else max_pixels
    refusals = [header_refusal(file, limit) for file in files]
    refused = [UnreadableImage(file, reason) for file, reason in zip(files, refusals, strict=True) if reason]
    decodable = [file for file, reason in zip(files, refusals, strict=True) if not reason]
    with tqdm(total=len(files), unit="image", desc="classifying", file=messages, disable=not progress) as bar:
        bar.update(len(refused))
        predictions, failures = predict_readable_images(decodable, classifier, batch_size=batch_size, on_progress=bar.update)
        bar.update(len(failures))  # the pipeline drops unreadable files without counting them
    order = {file: index for index, file in enumerate(files)}
    failures = sorted([*refused, *failures], key=lambda failure: order[failure.cell_key])
    for failure in failures:
        print(f"skipped {failure.cell_key}: {failure.reason}", file=messages)

    table = classification_table(predictions, list(classifier.contract.class_names))
    if isinstance(output, str | os.PathLike):
        _write_csv_atomically(table, Path(output))
    else:
        table.to_csv(output, index=False, float_format="%.6f")
    return ClassifyOutcome(classified=len(table), failures=tuple(failures))


def _write_csv_atomically(table: pd.DataFrame, path: Path) -> None:
    """A crash mid-write must not leave a truncated CSV that looks complete to the next script."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", newline="") as stream:
            table.to_csv(stream, index=False, float_format="%.6f")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
