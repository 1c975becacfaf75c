"""The features files contract: ``data/features/{train,val,test}.npz`` and ``data/taps/``, writers and readers.

extract_features writes the features files and extract_taps the tap activations; train_head,
evaluate and export read them. Both sides live here, with the records the readers return
(:class:`Features`, :class:`Block`, :class:`Taps`), so that a change to the format is one change
in one module (docs/DESIGN.md describes the keys). The heads import these records; nothing here
imports a head.

Memory stays bounded however many rows a file holds: a features file is an uncompressed ``.npz``
(``np.load`` reads it) whose ``features.npy`` member the writer streams in chunks
(:class:`RowChunks`) and the reader memory-maps (:func:`map_matrix`), after checking that the
file is not cut short (:class:`TruncatedFile`). Passes over all rows go through
:func:`row_chunks`, which releases each chunk's pages once it is used, so the process's resident
memory holds about one chunk of the file, not the file.

The taps folder (``data/taps/``) holds ``taps.json``, an index naming each tapped member's
sub-folder (``{"members": {}}`` when no head needs taps), and per member
``<member>/{train,val,test}.npy`` (float16 maps, rows in the features files' order),
``<member>/taps.json`` (layer, shape, engine, and a digest of each split's rows) and
``<member>/backbone.keras`` (the frozen backbone that computed them).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from transferlab.backbones import taps as taps_module
from transferlab.core import atomic

SPLITS = ("train", "val", "test")
REQUIRED_KEYS = (
    "features",
    "labels",
    "class_names",
    "paths",
    "sha256",
    "recipes",
    "block_specs",
    "block_weights",
    "block_widths",
    "block_offsets",
)
RANDOM_INIT_PREFIX = "random-init"  # the weights identity of a random-init backbone starts with it
TAPS_FORMAT = "transferlab-taps"
TAPS_VERSION = 2  # 2: one sub-folder per member in data/taps/ (1: data/features/taps/, one member)
CHUNK_ROWS = 8192  # rows written, checked or released at once: 8192 x 1280 float32 = 42 MB, whatever the file's size
MATRIX_MEMBER = "features.npy"  # the features matrix inside a features file, memory-mapped by the readers
_DATA_ALIGN = 64  # the matrix's first byte lies at a multiple of this in the file (numpy's own alignment)
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # a zip local file header: signature ... name length, extra length


@dataclass(frozen=True)
class Block:
    """One backbone's columns within a features matrix."""

    spec: str
    weights: str
    width: int
    offset: int
    name: str = ""  # the registry name (block_names), when the features file records it

    @property
    def random_init(self) -> bool:
        """True when the backbone ran with random weights (tests only; never a real result)."""
        return self.weights.startswith(RANDOM_INIT_PREFIX)

    def describe(self) -> dict[str, Any]:
        """The block as a JSON-ready mapping, with its random-init flag spelled out."""
        return {**asdict(self), "random_init": self.random_init}


def stack_name(blocks: Sequence[Block]) -> str:
    """The stack's name, members joined by ``+`` (``mobilenet_v2``, ``a+b``)."""
    return "+".join(block.name or block.spec for block in blocks)


@dataclass(frozen=True, eq=False)
class Taps:
    """A split's tap activations of one member, read by the heads that fine-tune (data/taps/<member>/).

    extract_taps writes them when a head fine-tunes a Keras member of the stack (``finetune``,
    or ``fusion``): the input of one layer of that member, one map per features row, in the same
    order.

    Attributes:
        activations: (N, H, W, C) float16, usually a read-only memory map of ``<member>/<split>.npy``.
        layer: the layer they feed (the first layer the head trains).
        block: the member they come from (its block name).
        backbone_file: the frozen backbone (raw pixels to embedding) that computed them.
        description: ``<member>/taps.json`` (member, weights, image size, engine, shape, rows).
    """

    activations: np.ndarray
    layer: str
    block: str
    backbone_file: Path
    description: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)  # arrays inside: compare the fields you mean, not the whole
class Features:
    """One split of the extract_features stage's output (see docs/DESIGN.md)."""

    features: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    blocks: tuple[Block, ...]
    paths: tuple[str, ...] = ()
    sha256: tuple[str, ...] = ()
    recipes: tuple[str, ...] = ()
    engine: Any = None
    source: str = "<memory>"
    # The folder that ``paths`` are relative to (data/raw/images), when the stage was given it:
    # heads that read pixels instead of features (``scratch``) open the rows' images there.
    images_directory: Path | None = None
    # The decompression-bomb limit for opening those images (params download.max_image_pixels).
    max_image_pixels: int | None = None
    # Tap activations of the rows by member name, when extract_taps wrote some and the reader
    # was given its folder (see :func:`load_splits`); empty otherwise.
    taps: Mapping[str, Taps] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(block.width for block in self.blocks)

    @property
    def block_engines(self) -> tuple[str | None, ...]:
        """The engine each block's features came from (None where the file does not record it)."""
        if isinstance(self.engine, list):
            return tuple(self.engine)
        return (self.engine,) * len(self.blocks)


PER_ROW_KEYS = ("paths", "sha256", "recipes")  # string columns of a features file, one entry per row


class RowStrings(Sequence[str]):
    """A per-row string column of a features file (:data:`PER_ROW_KEYS`), read only when first used.

    The columns cost about 0.6 KB per row as Python strings, and only some readers need them
    (evaluate's predictions, the scratch head, taps); train_head on 10^6 rows must not pay for
    them. The length is known from the column's header; the values are read on first access.
    """

    def __init__(self, path: Path, key: str, rows: int) -> None:
        self.path, self.key, self.rows = path, key, rows
        self._values: tuple[str, ...] | None = None

    def values(self) -> tuple[str, ...]:
        """The column, read from the file once."""
        if self._values is None:
            try:
                with np.load(self.path, allow_pickle=False) as archive:
                    column = archive[self.key]
            except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as error:
                raise ValueError(
                    f"{self.path}: its '{self.key}' column cannot be read ({error}); re-run extract_features"
                ) from None
            values = tuple(str(item) for item in column.reshape(-1))
            if len(values) != self.rows:
                raise ValueError(f"{self.path}: '{self.key}' changed since it was opened; re-run the stage")
            self._values = values
        return self._values

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, index: Any) -> Any:
        return self.values()[index]

    def __iter__(self) -> Iterator[str]:
        return iter(self.values())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and tuple(self) == tuple(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"RowStrings({str(self.path)!r}, {self.key!r}, rows={self.rows})"


def _column_length(archive: Any, key: str) -> int:
    """The number of strings of a per-row column of an open ``.npz``, read from its header only.

    Raises:
        ValueError: the column holds Python objects.
    """
    with archive.zip.open(f"{key}.npy") as member:
        version = np.lib.format.read_magic(member)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(member)
    if dtype.hasobject:  # np.load would refuse it (allow_pickle=False) when the column is read
        raise ValueError(f"its '{key}' column holds Python objects, not strings")
    return int(np.prod(shape, dtype=np.int64))


class TruncatedFile(ValueError):
    """A features or taps file that ends before its array does (a copy cut short, a full disk)."""


@dataclass(frozen=True)
class RowChunks:
    """A features matrix made chunk by chunk, in row order, so that it is never whole in memory.

    Attributes:
        shape: (rows, width) of the whole matrix.
        dtype: its float type (each chunk is cast to it).
        chunks: called once per pass, yields (rows, width) arrays covering the rows in order.
    """

    shape: tuple[int, int]
    dtype: np.dtype
    chunks: Callable[[], Iterator[np.ndarray]]

    @classmethod
    def of(cls, matrix: np.ndarray, rows: int | None = None) -> RowChunks:
        """An in-memory (or memory-mapped) matrix, served ``rows`` rows at a time."""
        shape = (int(matrix.shape[0]), int(matrix.shape[1]))
        return cls(shape, matrix.dtype, lambda: (chunk for _, chunk in row_chunks(matrix, rows)))

    def materialize(self) -> np.ndarray:
        """The whole matrix in memory (for tests and small callers; the writer never does this)."""
        matrix = np.empty(self.shape, dtype=self.dtype)
        position = 0
        for chunk in self.chunks():
            matrix[position : position + len(chunk)] = chunk
            position += len(chunk)
        return matrix


class _Arrays(dict):
    """A feature set's arrays; ``["features"]`` builds the matrix from its :class:`RowChunks` when asked."""

    def __init__(self, arrays: Mapping[str, np.ndarray], matrix: RowChunks | None) -> None:
        super().__init__(arrays)
        self.matrix = matrix

    def __missing__(self, key: str) -> np.ndarray:
        if key == "features" and self.matrix is not None:
            return self.matrix.materialize()
        raise KeyError(key)


@dataclass
class FeatureSet:
    """The arrays of one features file, as extract_features assembles them (key -> array).

    The features matrix is either ``arrays["features"]`` or, so that extract_features never holds
    it whole, ``matrix``: chunks the writer streams into the file. ``arrays["features"]`` then
    still works, building the whole matrix on each access (tests compare it).
    """

    arrays: dict[str, np.ndarray]
    matrix: RowChunks | None = None

    def __post_init__(self) -> None:
        if self.matrix is not None:
            if "features" in self.arrays:
                raise ValueError("a feature set holds its features in arrays or as row chunks, not both")
            self.arrays = _Arrays(self.arrays, self.matrix)

    def rows(self) -> RowChunks:
        """The features matrix as row chunks, whichever way it is held."""
        return self.matrix if self.matrix is not None else RowChunks.of(np.asarray(self.arrays["features"]))


# ---------------------------------------------------------------- writing


def write_feature_files(directory: Path, feature_sets: Mapping[str, FeatureSet]) -> None:
    """Writes one ``<split>.npz`` per entry of ``feature_sets`` into ``directory`` (the caller makes it atomic).

    Each file is an uncompressed ``.npz`` (what ``np.savez`` writes, so ``np.load`` reads it); the
    features matrix is streamed into its ``features.npy`` member chunk by chunk, its first byte
    aligned to 64 in the file, so that :func:`load_features` can memory-map it.

    Raises:
        ValueError: a feature set lacks a key of :data:`REQUIRED_KEYS` (the readers would refuse the file).
    """
    for split, feature_set in feature_sets.items():
        held = {*feature_set.arrays, *(["features"] if feature_set.matrix is not None else [])}
        missing = [key for key in REQUIRED_KEYS if key not in held]
        if missing:
            raise ValueError(
                f"the {split} features lack key(s) {', '.join(missing)}; this is a bug in extract_features"
            )
    directory.mkdir(parents=True, exist_ok=True)
    for split, feature_set in feature_sets.items():
        write_features_file(directory / f"{split}.npz", feature_set)


def write_features_file(path: Path, feature_set: FeatureSet) -> None:
    """Writes one features file: the matrix first, streamed and aligned, then the small arrays.

    The file is written beside ``path`` and renamed onto it, never rewritten in place: a process
    that has the old file memory-mapped keeps reading the old bytes (a file truncated under a
    memory map would kill its reader with SIGBUS).
    """
    with atomic.atomic_path(path) as temporary:
        _write_features_file(temporary, feature_set)


def _write_features_file(path: Path, feature_set: FeatureSet) -> None:
    matrix = feature_set.rows()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open(MATRIX_MEMBER, "w", force_zip64=True) as member:
            data_start = archive.fp.tell()  # the member's local header is written: its data starts here
            member.write(_aligned_npy_header(matrix.shape, matrix.dtype, data_start))
            written = 0
            for chunk in matrix.chunks():
                chunk = np.ascontiguousarray(chunk, dtype=matrix.dtype)
                if chunk.ndim != 2 or chunk.shape[1] != matrix.shape[1]:
                    raise ValueError(f"{path}: a chunk of shape {chunk.shape} in a {matrix.shape} matrix (a bug)")
                member.write(memoryview(chunk).cast("B"))
                written += len(chunk)
            if written != matrix.shape[0]:
                raise ValueError(f"{path}: {written} rows written for a {matrix.shape} matrix (a bug)")
        for key, value in feature_set.arrays.items():
            if key != "features":
                with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                    if isinstance(value, np.ndarray):
                        np.lib.format.write_array(member, value, allow_pickle=False)
                    else:
                        _write_strings(member, value)


def _write_strings(member: Any, strings: Sequence[str]) -> None:
    """Writes a list of strings as the ``.npy`` that ``np.array(strings, dtype=str)`` would give, in chunks.

    The same bytes, without the whole numpy copy (4 bytes a character, 0.6 KB a row for the
    per-row columns of an augmented training split).
    """
    width = max((len(text) for text in strings), default=0) or 1
    dtype = np.dtype(f"<U{width}")
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (len(strings),)}
    np.lib.format.write_array_header_1_0(member, header)
    for start in range(0, len(strings), CHUNK_ROWS):
        member.write(np.array(strings[start : start + CHUNK_ROWS], dtype=dtype).tobytes())


def _aligned_npy_header(shape: tuple[int, ...], dtype: np.dtype, data_start: int) -> bytes:
    """A ``.npy`` version 1.0 header padded so that the array's data begins at a multiple of 64 in the file."""
    fields = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}
    text = repr(fields)
    prefix = len(np.lib.format.MAGIC_PREFIX) + 2 + 2  # magic, version, header length (uint16)
    padding = -(data_start + prefix + len(text) + 1) % _DATA_ALIGN
    header = (text + " " * padding + "\n").encode("latin1")
    return np.lib.format.magic(1, 0) + struct.pack("<H", len(header)) + header


# ---------------------------------------------------------------- reading


def load_features(
    path: str | os.PathLike,
    *,
    images_directory: str | os.PathLike | None = None,
    max_image_pixels: int | None = None,
) -> Features:
    """Reads and checks one features file written by extract_features (see docs/DESIGN.md).

    Args:
        path: the ``.npz`` file.
        images_directory: the folder its ``paths`` are relative to (data/raw/images), recorded
            in the result for heads that read pixels; ``None`` when only features are needed.
        max_image_pixels: the decompression-bomb limit for opening those images (params
            ``download.max_image_pixels``), recorded beside ``images_directory``.

    Raises:
        ValueError: naming the file, when it is missing, unreadable or breaks the contract.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"features file {path} not found; run the extract_features stage first (dvc repro extract_features)"
        )
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files if key != "features" and key not in PER_ROW_KEYS}
            lengths = {key: _column_length(archive, key) for key in PER_ROW_KEYS if key in archive.files}
        arrays["features"] = map_matrix(path)
    except TruncatedFile:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path} is not a readable features file ({error}); re-run extract_features") from None
    missing = [key for key in REQUIRED_KEYS if key not in arrays and key not in lengths]
    if missing:
        raise ValueError(f"{path} lacks key(s) {', '.join(missing)}; re-run extract_features")
    blocks = _blocks(arrays, path)
    features, labels, class_names = _matrix(arrays, path, blocks)
    rows = features.shape[0]
    for key, length in lengths.items():
        if length != rows:
            raise ValueError(f"{path}: '{key}' has {length} entries for {rows} feature rows; re-run extract_features")
    per_row = {key: RowStrings(path, key, rows) for key in PER_ROW_KEYS}
    return Features(
        features=features,
        labels=labels,
        class_names=class_names,
        blocks=blocks,
        paths=per_row["paths"],
        sha256=per_row["sha256"],
        recipes=per_row["recipes"],
        engine=_engine(arrays),
        source=str(path),
        images_directory=None if images_directory is None else Path(images_directory),
        max_image_pixels=max_image_pixels,
    )


def map_matrix(path: Path) -> np.ndarray:
    """The ``features`` array of a features file, memory-mapped read-only (read whole if stored compressed).

    The member's local zip header and ``.npy`` header give where the array's bytes start; a file
    that ends before them is refused.

    Raises:
        TruncatedFile: the file ends before the matrix does (naming the bytes present and needed).
        ValueError: the file has no ``features`` member.
        zipfile.BadZipFile, OSError: the file is not a readable zip archive.
    """
    with zipfile.ZipFile(path) as archive:
        try:
            info = archive.getinfo(MATRIX_MEMBER)
        except KeyError:
            raise ValueError(f"no '{MATRIX_MEMBER}' member") from None
        if info.compress_type != zipfile.ZIP_STORED:  # written by np.savez_compressed: no mapping possible
            with archive.open(info) as member:
                return np.lib.format.read_array(member, allow_pickle=False)
    size = path.stat().st_size
    with path.open("rb") as file:
        file.seek(info.header_offset)
        header = file.read(_LOCAL_HEADER.size)
        if len(header) < _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
            raise ValueError(f"{path} is damaged: no zip header where its features member should start")
        *_, name_length, extra_length = _LOCAL_HEADER.unpack(header)
        member_start = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
        file.seek(member_start)
        shape, fortran_order, dtype, needed = _npy_header(file)
        start = file.tell()
    held = min(member_start + info.file_size, size)  # the matrix's bytes end at the member's or the file's end
    if held < needed:
        raise TruncatedFile(
            f"{path} is truncated ({held - member_start} of {needed - member_start} bytes of its features matrix); "
            "re-run extract_features"
        )
    if dtype.hasobject:
        raise ValueError(f"'features' holds Python objects ({dtype}), not floats")
    if not shape or 0 in shape:  # np.memmap cannot map zero bytes
        return np.zeros(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=start, shape=shape, order="F" if fortran_order else "C")


def _npy_header(file: Any) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """Reads a ``.npy`` header at the file's position: shape, Fortran order, dtype, and where the data ends."""
    version = np.lib.format.read_magic(file)
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = reader(file)
    return shape, fortran_order, dtype, file.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def refuse_truncated_npy(path: Path, stage: str) -> None:
    """Raises :class:`TruncatedFile` when the ``.npy`` file ``path`` ends before its array does.

    Args:
        path: the file.
        stage: the stage to re-run, named in the message.
    """
    with path.open("rb") as file:
        *_, needed = _npy_header(file)
    size = path.stat().st_size
    if size < needed:
        raise TruncatedFile(f"{path} is truncated ({size} of {needed} bytes); re-run {stage}")


def row_chunks(matrix: np.ndarray, rows: int | None = None) -> Iterator[tuple[slice, np.ndarray]]:
    """(row range, rows) of ``matrix``, ``rows`` at a time (default :data:`CHUNK_ROWS`), in order.

    When ``matrix`` is memory-mapped (:func:`load_features`), the pages of each chunk are released
    from this process once the caller has moved on (``madvise(MADV_DONTNEED)``: the file stays in
    the page cache, a later read maps it again), so a pass over a large features file keeps the
    process's resident memory at about one chunk instead of the whole file.
    """
    rows = rows or CHUNK_ROWS
    mapping = _mapping_of(matrix)
    for start in range(0, len(matrix), rows):
        part = slice(start, min(start + rows, len(matrix)))
        chunk = matrix[part]
        yield part, chunk
        if mapping is not None and chunk.size:
            _release(mapping, chunk)


def is_memory_mapped(matrix: np.ndarray) -> bool:
    """True when ``matrix`` (or the array it views) is a read-only memory map of a file."""
    return _mapping_of(matrix) is not None


def _mapping_of(matrix: np.ndarray) -> mmap.mmap | None:
    base = matrix
    while isinstance(base, np.ndarray):
        base = base.base
    # Read-only maps only: dropping the pages of a copy-on-write map would drop its changes.
    return base if isinstance(base, mmap.mmap) and memoryview(base).readonly else None


def _release(mapping: mmap.mmap, chunk: np.ndarray) -> None:
    """Drops the pages under ``chunk`` (a view into ``mapping``) from this process's resident memory."""
    if not hasattr(mapping, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):  # not Linux: nothing to do
        return
    origin = np.frombuffer(mapping, dtype=np.uint8, count=1).ctypes.data
    first = chunk.ctypes.data - origin
    start = first - first % mmap.PAGESIZE
    end = min(first + chunk.nbytes, len(mapping))
    mapping.madvise(mmap.MADV_DONTNEED, start, end - start)


# ---------------------------------------------------------------- tap activations (data/taps/)


def rows_digest(sha256: Sequence[str], recipes: Sequence[str]) -> str:
    """A digest of a split's rows in order (image sha256 and recipe): taps and features must share it."""
    digest = hashlib.sha256()
    for image, recipe in zip(sha256, recipes, strict=True):
        digest.update(f"{image}\t{recipe}\n".encode())
    return digest.hexdigest()


def tap_folder_name(member: str) -> str:
    """The sub-folder of data/taps/ holding one member's taps (its name, file-system safe)."""
    return "".join(character if character.isalnum() or character in "._-" else "_" for character in member)


def write_taps_index(directory: Path, folders: Mapping[str, str]) -> None:
    """Writes ``taps.json``, the index of ``directory`` (data/taps/): member name -> its sub-folder.

    With no member (no head needs taps) the file's bytes are always the same, so DVC sees an
    unchanged output when only the head changed.
    """
    directory.mkdir(parents=True, exist_ok=True)
    index = {"format": TAPS_FORMAT, "version": TAPS_VERSION, "members": dict(sorted(folders.items()))}
    (directory / taps_module.DESCRIPTION_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def write_tap_description(folder: Path, description: Mapping[str, Any]) -> None:
    """Writes one member's ``<member>/taps.json`` (see :func:`load_member_taps` for what is read back)."""
    text = json.dumps(dict(description), indent=2, sort_keys=True) + "\n"
    (folder / taps_module.DESCRIPTION_FILE).write_text(text, encoding="utf-8")


def load_taps(folder: str | os.PathLike, names: Sequence[str] = SPLITS) -> dict[str, dict[str, Taps]]:
    """Every member's tap activations in a taps folder (data/taps/), memory-mapped: {member: {split: Taps}}.

    Args:
        folder: the extract_taps stage's output folder.
        names: the splits to read.

    Raises:
        ValueError: naming the file, when the folder or a file is missing, unreadable or inconsistent.
    """
    folder = Path(folder)
    index_file = folder / taps_module.DESCRIPTION_FILE
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
        members = {str(name): str(sub) for name, sub in index["members"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(
            f"{index_file} is missing or unreadable ({error!r}); run the extract_taps stage (dvc repro extract_taps)"
        ) from None
    return {name: {split: load_member_taps(folder / sub, split) for split in names} for name, sub in members.items()}


def load_member_taps(folder: Path, split: str) -> Taps:
    """One member's taps of one split (``<folder>/<split>.npy`` and ``taps.json``), memory-mapped.

    Raises:
        ValueError: naming the file, when it is missing, unreadable or not one (H, W, C) map per row.
    """
    file = folder / f"{split}.npy"
    try:
        description = json.loads((folder / taps_module.DESCRIPTION_FILE).read_text(encoding="utf-8"))
        refuse_truncated_npy(file, "extract_taps")
        activations = np.load(file, mmap_mode="r", allow_pickle=False)
        layer, block = str(description["layer"]), str(description["member"])
    except TruncatedFile:
        raise
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"{file} or its {taps_module.DESCRIPTION_FILE} is missing or unreadable ({error!r}); re-run extract_taps"
        ) from None
    if activations.ndim != 4 or activations.shape[0] != description.get("rows", {}).get(split):
        raise ValueError(
            f"{file}: tap activations {activations.shape} do not give one (H, W, C) map per row of the {split} "
            f"split ({description.get('rows', {}).get(split)} rows in its taps.json); re-run extract_taps"
        )
    return Taps(
        activations=activations,
        layer=layer,
        block=block,
        backbone_file=folder / str(description.get("backbone_file", taps_module.BACKBONE_FILE)),
        description=description,
    )


def attach_taps(split: Features, name: str, taps: Mapping[str, Taps]) -> Features:
    """``split`` with ``taps`` (member name -> that member's taps of this split), checked to match its rows.

    Args:
        split: the features of one split.
        name: the split's name (train, val or test).
        taps: that split's taps by member, from :func:`load_taps`.

    Raises:
        ValueError: a member's taps were made for other rows (another split, other augmented views).
    """
    if not taps:  # nothing to check: the rows' strings are not even read (a logistic head at 10^6 rows)
        return split
    expected = rows_digest(split.sha256, split.recipes)
    for member, tapped in taps.items():
        if tapped.description.get("rows_sha256", {}).get(name) != expected:
            raise ValueError(
                f"the {name} tap activations of {member} ({tapped.backbone_file.parent}) were made for other rows "
                f"than {split.source}; run `dvc repro` so that extract_taps follows extract_features"
            )
    return replace(split, taps=dict(taps))


def _blocks(arrays: Mapping[str, np.ndarray], path: Path) -> tuple[Block, ...]:
    specs, weights = arrays["block_specs"].reshape(-1), arrays["block_weights"].reshape(-1)
    widths, offsets = arrays["block_widths"].reshape(-1), arrays["block_offsets"].reshape(-1)
    if not (len(specs) == len(weights) == len(widths) == len(offsets) >= 1):
        raise ValueError(
            f"{path}: block_specs, block_weights, block_widths and block_offsets must have one entry per block"
        )
    expected_offsets = np.concatenate([[0], np.cumsum(widths)[:-1]])
    if np.any(widths < 1) or not np.array_equal(offsets, expected_offsets):
        raise ValueError(
            f"{path}: block widths {widths.tolist()} and offsets {offsets.tolist()} do not tile the columns"
        )
    names = arrays["block_names"].reshape(-1) if "block_names" in arrays else [""] * len(specs)
    if len(names) != len(specs):
        raise ValueError(f"{path}: block_names must have one entry per block")
    return tuple(
        Block(spec=str(spec), weights=str(weight), width=int(width), offset=int(offset), name=str(name))
        for spec, weight, width, offset, name in zip(specs, weights, widths, offsets, names)
    )


def _matrix(
    arrays: Mapping[str, np.ndarray], path: Path, blocks: Sequence[Block]
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    features, labels = arrays["features"], arrays["labels"]
    class_names = tuple(str(name) for name in arrays["class_names"].reshape(-1))
    width = sum(block.width for block in blocks)
    if features.ndim != 2 or features.shape[1] != width or not np.issubdtype(features.dtype, np.floating):
        raise ValueError(
            f"{path}: 'features' must be float (N, {width}) to match its blocks, got {features.dtype} {features.shape}"
        )
    if labels.shape != (features.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: 'labels' must be integers, one per feature row, got {labels.dtype} {labels.shape}")
    if not class_names or len(set(class_names)) != len(class_names):
        raise ValueError(f"{path}: 'class_names' must be non-empty and unique, got {list(class_names)}")
    if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise ValueError(f"{path}: labels must lie in 0..{len(class_names) - 1} (one per class name)")
    bad_rows = sum(int(np.count_nonzero(~np.isfinite(chunk).all(axis=1))) for _, chunk in row_chunks(features))
    if bad_rows:
        raise ValueError(f"{path}: {bad_rows} feature row(s) hold NaN or infinity; re-run extract_features")
    return features, labels.astype(np.int64), class_names


def _engine(arrays: Mapping[str, np.ndarray]) -> Any:
    # Optional: extract_features may record the engine(s) it ran in the features file.
    for key in ("block_engines", "engine"):
        if key in arrays:
            values = [str(item) for item in arrays[key].reshape(-1)]
            return values[0] if len(values) == 1 else values
    return None


def load_splits(
    folder: str | os.PathLike,
    names: Sequence[str] = SPLITS,
    *,
    images_directory: str | os.PathLike | None = None,
    max_image_pixels: int | None = None,
    taps_directory: str | os.PathLike | None = None,
) -> dict[str, Features]:
    """Reads ``<folder>/<name>.npz`` for each split name; all must share classes and blocks.

    ``images_directory`` and ``max_image_pixels`` are passed on to :func:`load_features`. With
    ``taps_directory`` (data/taps/), each split also gets the tap activations of every member
    there (:attr:`Features.taps`), checked to belong to its rows.
    """
    splits = {
        name: load_features(
            Path(folder) / f"{name}.npz", images_directory=images_directory, max_image_pixels=max_image_pixels
        )
        for name in names
    }
    first = splits[names[0]]
    for split in splits.values():
        if split.class_names != first.class_names or split.blocks != first.blocks:
            raise ValueError(
                f"{split.source} and {first.source} differ in classes or backbones; they come from different "
                "extractions: re-run extract_features"
            )
    if taps_directory is not None:
        tapped = load_taps(taps_directory, names)
        splits = {
            name: attach_taps(split, name, {member: by_split[name] for member, by_split in tapped.items()})
            for name, split in splits.items()
        }
    return splits
