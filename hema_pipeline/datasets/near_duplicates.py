"""Perceptual hashes of cell images and the cross-split near-duplicate finder.

Byte-level hashes (``image_sha256``) catch only identical files. The same cell exported twice, re-encoded,
or slightly resized gets a new SHA-256 but a near-identical perceptual hash; such a pair across train and
test leaks the answer. The finder lists every pair of images in different splits whose 64-bit perceptual
hashes differ in at most ``max_distance`` bits.

Threshold, measured on the 10,796 PBC images (DCT hash, 64 bits): copies resized by 5% and re-encoded at
JPEG quality 70 lay 0-2 bits from their originals (300 tried). Across the whole set the only pair within
4 bits is a true duplicate, 2 bits apart (one monocyte photographed twice, shifted by a few pixels, under
two file names); the closest distinct cells are 6 bits apart. ``DEFAULT_MAX_DISTANCE`` = 4 sits between.

Search: exhaustive, vectorised XOR + popcount over uint64 arrays in blocks (``numpy.bitwise_count``); one
pass compares each split only with the splits after it, so every cross-split pair is tested once and no
within-split pair is. 20,000 hashes take well under a second, and unlike a tree or multi-index search the
cost does not depend on how clustered the hashes are (cell images are all alike: a round cell on a pink
background).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Final, Literal

import duckdb
import imagehash
import numpy as np
import pandas as pd
from PIL import Image

from hema_pipeline.storage.object_store import ObjectStore
from hema_pipeline.storage.warehouse import replace_rows

HashMethod = Literal["phash", "dhash"]
HASH_METHODS: Final[dict[str, Callable[[Image.Image], imagehash.ImageHash]]] = {
    "phash": imagehash.phash,  # DCT of a 32x32 greyscale image: robust to re-encoding and resizing
    "dhash": imagehash.dhash,  # gradient signs of a 9x8 greyscale image: ~4x faster, a little less robust
}
DEFAULT_HASH_METHOD: Final = "phash"
DEFAULT_MAX_DISTANCE: Final = 4
# A second, independent hash confirms each candidate pair. Measured: 300 PBC images resized by 5% and
# re-encoded at quality 70 stay within 3 dHash bits of their originals, while the distinct cells that come
# within 4-6 pHash bits of each other (procedurally drawn cells do: a centred round nucleus dominates the
# low frequencies pHash reads) lie 17-30 dHash bits apart. 10 sits well between.
DEFAULT_CONFIRM_MAX_DISTANCE: Final = 10
HASH_BITS: Final = 64
PAIR_COLUMNS: Final[tuple[str, ...]] = ("cell_uid_a", "split_a", "cell_uid_b", "split_b", "distance")
# Pairwise block: rows x all hashes stays around 4 M elements (32 MB of uint64) however large the input.
_BLOCK_ELEMENTS: Final = 1 << 22


def _hash_function(method: str) -> Callable[[Image.Image], imagehash.ImageHash]:
    try:
        return HASH_METHODS[method]
    except KeyError:
        raise ValueError(f"unknown hash method {method!r}; use one of {sorted(HASH_METHODS)}") from None


def hash_to_int(value: imagehash.ImageHash) -> int:
    """The 8x8 hash bits, row-major, as an unsigned 64-bit integer."""
    bits = np.asarray(value.hash, dtype=bool).reshape(-1)
    if bits.size != HASH_BITS:
        raise ValueError(f"expected a {HASH_BITS}-bit hash, got {bits.size} bits")
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def perceptual_hash(image: Image.Image, method: HashMethod = DEFAULT_HASH_METHOD) -> int:
    return hash_to_int(_hash_function(method)(image))


def perceptual_hash_of_bytes(data: bytes, method: HashMethod = DEFAULT_HASH_METHOD) -> int:
    """Hash of an encoded image, at full resolution: the same bits ``imagehash`` gives for the file, so
    anyone can reproduce a reported distance. (A reduced-scale JPEG decode was only ~15% faster and
    shifted some hashes by up to 4 bits.)"""
    with Image.open(io.BytesIO(data)) as image:
        return perceptual_hash(image, method)


def hash_files(
    paths: Sequence[str | os.PathLike[str]], method: HashMethod = DEFAULT_HASH_METHOD, max_workers: int | None = None
) -> np.ndarray:
    """uint64 hashes of image files, in the order of ``paths``."""
    _hash_function(method)

    def one(path: str | os.PathLike[str]) -> int:
        with open(path, "rb") as stream:
            return perceptual_hash_of_bytes(stream.read(), method)

    # Pillow releases the GIL while decoding and resizing, so threads use every core.
    with ThreadPoolExecutor(max_workers=max_workers or os.cpu_count() or 1) as pool:
        return np.fromiter(pool.map(one, paths), dtype=np.uint64, count=len(paths))


def hash_stored_images(
    store: ObjectStore, keys: Sequence[str], method: HashMethod = DEFAULT_HASH_METHOD, max_workers: int = 8
) -> np.ndarray:
    """uint64 hashes of images in an object store (local or S3), in the order of ``keys``."""
    _hash_function(method)
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        hashes = pool.map(lambda key: perceptual_hash_of_bytes(store.get_bytes(key), method), keys)
        return np.fromiter(hashes, dtype=np.uint64, count=len(keys))


def cached_perceptual_hashes(
    connection: duckdb.DuckDBPyConnection,
    store: ObjectStore,
    images: pd.DataFrame,
    method: HashMethod = DEFAULT_HASH_METHOD,
    max_workers: int = 8,
) -> pd.Series:
    """Perceptual hash per row of ``images`` (columns ``image_sha256``, ``image_key``), as a uint64 Series
    indexed like ``images``. Hashes are kept in the warehouse table ``image_perceptual_hashes`` by content
    hash, so each image is hashed once however many datasets use it; new ones are computed and written
    through the caller's connection (inside the caller's transaction, if one is open)."""
    _hash_function(method)
    wanted = images[["image_sha256", "image_key"]].drop_duplicates("image_sha256")
    connection.register("wanted_hashes", wanted[["image_sha256"]])
    try:
        known = connection.execute(
            "select h.image_sha256, h.hash from image_perceptual_hashes h "
            "join wanted_hashes w using (image_sha256) where h.method = ?",
            [method],
        ).df()
    finally:
        connection.unregister("wanted_hashes")
    by_sha = dict(zip(known["image_sha256"], known["hash"].astype(np.uint64), strict=True))
    missing = wanted.loc[~wanted["image_sha256"].isin(by_sha.keys())]
    if not missing.empty:
        computed = hash_stored_images(store, list(missing["image_key"]), method, max_workers)
        replace_rows(
            connection,
            "image_perceptual_hashes",
            pd.DataFrame({"image_sha256": missing["image_sha256"].to_numpy(), "method": method, "hash": computed}),
            ["image_sha256", "method"],
        )
        by_sha.update(zip(missing["image_sha256"], computed, strict=True))
    return images["image_sha256"].map(by_sha).astype(np.uint64)


def hamming_distances(hashes_a: np.ndarray, hashes_b: np.ndarray) -> np.ndarray:
    """All pairwise bit distances, shape (len(a), len(b)), uint8."""
    a = np.asarray(hashes_a, dtype=np.uint64)
    b = np.asarray(hashes_b, dtype=np.uint64)
    return np.bitwise_count(a[:, None] ^ b[None, :])


def find_cross_split_near_duplicates(
    cell_uids: Sequence[str],
    splits: Sequence[str],
    hashes: Sequence[int] | np.ndarray,
    max_distance: int = DEFAULT_MAX_DISTANCE,
) -> pd.DataFrame:
    """Pairs of images in different splits whose hashes differ in at most ``max_distance`` bits.

    Returns columns ``cell_uid_a, split_a, cell_uid_b, split_b, distance``, one row per pair (split_a sorts
    before split_b), ordered by distance, then the cell uids. Empty when the splits are clean."""
    if not len(cell_uids) == len(splits) == len(hashes):
        raise ValueError("cell_uids, splits and hashes must have the same length")
    if not 0 <= max_distance < HASH_BITS:
        raise ValueError(f"max_distance must be in [0, {HASH_BITS})")
    uid_array = np.asarray(cell_uids, dtype=object)
    split_array = np.asarray(splits, dtype=object)
    hash_array = np.asarray(hashes, dtype=np.uint64)
    # Rows grouped by split (split names sorted): each split is compared with the splits after it only.
    order = np.lexsort((uid_array.astype(str), split_array.astype(str)))
    uid_array, split_array, hash_array = uid_array[order], split_array[order], hash_array[order]
    _, split_starts = np.unique(split_array.astype(str), return_index=True)
    split_ends = list(split_starts[1:]) + [len(split_array)]

    found_a: list[np.ndarray] = []
    found_b: list[np.ndarray] = []
    found_distance: list[np.ndarray] = []
    for start, end in zip(split_starts, split_ends, strict=True):
        later = hash_array[end:]
        if later.size == 0:
            continue
        block = max(1, _BLOCK_ELEMENTS // later.size)
        for block_start in range(start, end, block):
            block_end = min(block_start + block, end)
            distances = hamming_distances(hash_array[block_start:block_end], later)
            rows, columns = np.nonzero(distances <= max_distance)
            found_a.append(rows + block_start)
            found_b.append(columns + end)
            found_distance.append(distances[rows, columns])

    if not found_a or not sum(len(part) for part in found_a):
        return pd.DataFrame({name: pd.Series(dtype="int64" if name == "distance" else object) for name in PAIR_COLUMNS})
    index_a = np.concatenate(found_a)
    index_b = np.concatenate(found_b)
    pairs = pd.DataFrame(
        {
            "cell_uid_a": uid_array[index_a],
            "split_a": split_array[index_a],
            "cell_uid_b": uid_array[index_b],
            "split_b": split_array[index_b],
            "distance": np.concatenate(found_distance).astype("int64"),
        }
    )
    return pairs.sort_values(["distance", "cell_uid_a", "cell_uid_b"], kind="stable").reset_index(drop=True)


def cross_split_near_duplicates_in_manifest(
    connection: duckdb.DuckDBPyConnection,
    store: ObjectStore,
    manifest: pd.DataFrame,
    max_distance: int = DEFAULT_MAX_DISTANCE,
    method: HashMethod = DEFAULT_HASH_METHOD,
    confirm_max_distance: int | None = DEFAULT_CONFIRM_MAX_DISTANCE,
) -> pd.DataFrame:
    """The near-duplicate pairs across the splits of a dataset manifest (columns ``cell_uid``, ``split``,
    ``image_sha256``, ``image_key``), hashing through the warehouse cache. Empty when the splits are clean.

    Candidates within ``max_distance`` by ``method`` are confirmed by the other hash (dHash after pHash)
    within ``confirm_max_distance`` (None: no confirmation); see ``DEFAULT_CONFIRM_MAX_DISTANCE``."""
    hashes = cached_perceptual_hashes(connection, store, manifest, method)
    pairs = find_cross_split_near_duplicates(
        manifest["cell_uid"].tolist(), manifest["split"].tolist(), hashes.to_numpy(), max_distance
    )
    if pairs.empty or confirm_max_distance is None:
        return pairs
    confirming_method: HashMethod = "dhash" if method == "phash" else "phash"
    key_by_cell = dict(zip(manifest["cell_uid"], manifest["image_key"], strict=True))
    cells = sorted(set(pairs["cell_uid_a"]) | set(pairs["cell_uid_b"]))
    confirming = dict(
        zip(cells, hash_stored_images(store, [key_by_cell[cell] for cell in cells], confirming_method), strict=True)
    )
    distances = [
        int(np.bitwise_count(confirming[a] ^ confirming[b]))
        for a, b in zip(pairs["cell_uid_a"], pairs["cell_uid_b"], strict=True)
    ]
    return pairs[np.asarray(distances) <= confirm_max_distance].reset_index(drop=True)


def near_duplicates_across_patients(
    connection: duckdb.DuckDBPyConnection,
    store: ObjectStore,
    cells: pd.DataFrame,
    max_distance: int = DEFAULT_MAX_DISTANCE,
    method: HashMethod = DEFAULT_HASH_METHOD,
) -> pd.DataFrame:
    """Confirmed near-duplicate pairs between cells of *different* patients (``cell_uid``, ``patient_id``,
    ``image_sha256``, ``image_key``): the same cell exported twice, or under two accessions. Split by
    patient, such a pair could land in two splits; found before splitting, one of it can be dropped."""
    by_patient = cells.loc[:, ["cell_uid", "image_sha256", "image_key"]].assign(split=cells["patient_id"].astype(str))
    return cross_split_near_duplicates_in_manifest(connection, store, by_patient, max_distance, method)


def cells_to_drop_for_near_duplicates(pairs: pd.DataFrame) -> set[str]:
    """One cell of each pair, deterministically (the larger ``cell_uid``), so the other stays."""
    return {max(a, b) for a, b in zip(pairs["cell_uid_a"], pairs["cell_uid_b"], strict=True)}
