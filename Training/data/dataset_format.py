"""The on-disk slice data set shared by the phantom, the LIDC DICOM path and the pickle importer.

A data set is a directory (see docs/TRAINING.md for the full description):

    images.npy          (S, H, W) int16 HU, or float32 in [0, 1] when meta["intensity"] == "unit"
    masks.npy           (S, 4, H, W) bool, one mask a reader slot (empty when the reader is absent)
    reader_present.npy  (S, 4) bool, which reader slots hold a real annotation of the nodule
    neighbours.npy      (S, 2, H, W) like images.npy: the slices just below and above each slice (k - 1, k + 1,
                        the slice itself at the volume's ends), for models that read neighbouring slices;
                        written by the volume builders (phantom, DICOM), absent for the pickle importer
    slices.csv          one row a slice (columns: COLUMNS + the per-reader rating columns)
    splits.json         train / val / test split with its seed and unit ("patient" or "series_uid")
    meta.json           format, version, source, intensity, crop size, counts, build parameters

The DICOM and phantom builders store only slices where at least one reader's mask is non-empty; the
pickle importer's literature split keeps every slice (n_marked = 0 for the empty ones). Writing goes to a temporary
directory that is renamed into place when complete, so a data set on disk is always whole.
No torch here: this module is the reader for scripts (load_split) and for Training/data/batches.py.
"""
from __future__ import annotations

import csv
import json
import math
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

import numpy as np

from ProbSAMLib.demo.phantom import RATING_NAMES
from ProbSAMLib.errors import InputError, SettingsError
from ProbSAMLib.geometry import slices_with_neighbours
from ProbSAMLib.io.outputdir import OutputFolder
from Training import guards

FORMAT = "probsam-lidc-slices"
VERSION = 1
N_READERS = 4
RATING_COLUMNS = tuple(f"{name}_{r}" for r in range(N_READERS) for name in RATING_NAMES)
ANNOTATION_COLUMNS = tuple(f"annotation_id_{r}" for r in range(N_READERS))
COLUMNS = ("index", "patient_id", "series_uid", "scan_id", "nodule_id", "k", "z_mm", "crop_row0",
           "crop_col0", "n_readers", "n_marked", "truncated", "source_key") + ANNOTATION_COLUMNS \
    + RATING_COLUMNS + ("case", "case_variant")
_INT_COLUMNS = {"index", "scan_id", "k", "crop_row0", "crop_col0", "n_readers", "n_marked",
                "truncated"} | set(ANNOTATION_COLUMNS) | set(RATING_COLUMNS)
_FLOAT_COLUMNS = {"z_mm"}
SPLIT_FRACTIONS = (0.64, 0.16, 0.20)


@dataclass
class Chunk:
    """A batch of slices ready to write: images (n, H, W), masks (n, 4, H, W) bool,
    present (n, 4) bool, one row dict a slice (keys from COLUMNS; missing ones default) and, from a
    volume, neighbours (n, 2, H, W): the slices below and above each one."""

    images: np.ndarray
    masks: np.ndarray
    present: np.ndarray
    rows: list
    neighbours: Optional[np.ndarray] = None

    @property
    def n(self) -> int:
        return len(self.rows)

    @property
    def has_neighbours(self) -> bool:
        return self.neighbours is not None

    def load(self) -> "Chunk":
        return self


def empty_chunk(height: int, width: int, dtype=np.int16) -> Chunk:
    return Chunk(np.zeros((0, height, width), dtype), np.zeros((0, N_READERS, height, width), bool),
                 np.zeros((0, N_READERS), bool), [], np.zeros((0, 2, height, width), dtype))


def concat_chunks(chunks: Sequence[Chunk]) -> Chunk:
    """One chunk of all; it keeps neighbours only when every chunk has them."""
    with_neighbours = all(c.has_neighbours for c in chunks)
    return Chunk(*(np.concatenate([getattr(c, name) for c in chunks])
                   for name in ("images", "masks", "present")), [r for c in chunks for r in c.rows],
                 np.concatenate([c.neighbours for c in chunks]) if with_neighbours else None)


def slices_from_volume(image: np.ndarray, reader_masks: np.ndarray, row: dict,
                       z_positions: Optional[Sequence[float]] = None, k0: int = 0) -> Chunk:
    """Axial slices of one nodule volume where at least one reader marked something.

    image: (K, H, W); reader_masks: (R, K, H, W) bool with R <= 4 readers (the rest become empty,
    absent slots); row: the nodule's columns, completed here with k, z_mm, n_readers, n_marked.
    """
    n_readers, depth = reader_masks.shape[:2]
    if n_readers > N_READERS or image.shape != reader_masks.shape[1:]:
        raise ValueError(f"image {image.shape} / masks {reader_masks.shape} do not match")
    marked = reader_masks.reshape(n_readers, depth, -1).any(axis=2)  # (R, K)
    keep = np.nonzero(marked.any(axis=0))[0]
    masks = np.zeros((len(keep), N_READERS) + image.shape[1:], dtype=bool)
    masks[:, :n_readers] = reader_masks[:, keep].transpose(1, 0, 2, 3)
    present = np.zeros((len(keep), N_READERS), dtype=bool)
    present[:, :n_readers] = True
    rows = [dict(row, k=int(k0 + k), n_readers=n_readers, n_marked=int(marked[:, k].sum()),
                 z_mm=float(z_positions[k]) if z_positions is not None else float("nan"))
            for k in keep]
    neighbours = np.ascontiguousarray(slices_with_neighbours(image, keep)[:, [0, 2]])  # below, above
    return Chunk(np.ascontiguousarray(image[keep]), masks, present, rows, neighbours)


def make_splits(patient_ids: Iterable[str], seed: int = 0) -> dict:
    """Patient-level 64/16/20 split: 20 % of patients to test, then 20 % of the rest to val
    (the PHiSeg convention of two 80/20 splits), from one seeded permutation of the sorted ids."""
    ids = np.array(sorted(set(patient_ids)), dtype=object)
    order = list(ids[np.random.default_rng(seed).permutation(len(ids))])

    def count(n: int) -> int:  # ceil like scikit-learn, but never empty the training side
        return min(math.ceil(0.2 * n), n - 1) if n > 1 else 0

    n_test = count(len(order))
    test, rest = order[:n_test], order[n_test:]
    n_val = count(len(rest))
    return {"seed": int(seed), "fractions": list(SPLIT_FRACTIONS), "unit": "patient",
            "train": sorted(rest[n_val:]), "val": sorted(rest[:n_val]), "test": sorted(test)}


def literature_splits(series_uids: Iterable[str]) -> dict:
    """The LIDC literature split (PHiSeg / MoSE code): scikit-learn's ``train_test_split(test_size=0.2,
    random_state=0)`` on the sorted unique series UIDs -> (train+val, test), then the same call on
    train+val -> (train, val): 64 / 16 / 20 % of the series. Reproduce it to report against the
    published LIDC table."""
    from sklearn.model_selection import train_test_split

    uids = sorted(set(series_uids))
    rest, test = train_test_split(uids, test_size=0.2, random_state=0)
    train, val = train_test_split(rest, test_size=0.2, random_state=0)
    return {"seed": 0, "fractions": list(SPLIT_FRACTIONS), "unit": "series_uid", "rule": "literature",
            "train": sorted(train), "val": sorted(val), "test": sorted(test)}


def check_output(out, force: bool, inputs=(), tool: str = "ProbSAMLib") -> Path:
    """Refuse an unusable output (exists without `force`, overlaps an input, another tool's folder, ...)
    before any work. `tool`: the builder's name, written into the data set's marker."""
    OutputFolder(out, force, inputs=inputs, tool=tool).check()
    return Path(out)


def _counts(rows: List[dict]) -> dict:
    """Nodule and slice counts by number of readers, for meta.json and the build report."""
    nodules = {}
    for r in rows:
        nodules[r["nodule_id"]] = r["n_readers"]
    by_slice = Counter(r["n_readers"] for r in rows)
    by_nodule = Counter(nodules.values())
    return {"n_slices": len(rows), "n_nodules": len(nodules),
            "n_patients": len({r["patient_id"] for r in rows}),
            "slices_by_readers": {str(k): by_slice[k] for k in sorted(by_slice)},
            "nodules_by_readers": {str(k): by_nodule[k] for k in sorted(by_nodule)}}


def _write_csv(path: Path, rows: List[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, restval="", extrasaction="raise")
        writer.writeheader()
        writer.writerows(rows)


def write_dataset(out, chunks: Sequence, meta: dict, seed: int = 0, force: bool = False,
                  splits: Optional[dict] = None, split_rule: str = "patient", tool: str = "ProbSAMLib",
                  inputs: Sequence = ()) -> dict:
    """Write chunks (anything with `.n` and `.load() -> Chunk`) as one data set at `out`.

    split_rule: "patient" (make_splits, seeded) or "literature" (literature_splits on series UIDs).
    Arrays are streamed into memory-mapped .npy files in a temporary sibling directory, which is
    renamed to `out` at the end. `splits` (make_splits of a superset of the patients, decided before
    the slices were made) is written restricted to the patients present; None splits the patients of
    the written slices. `tool` (the builder's name) goes into the marker: --force replaces only its own data
    sets; `inputs` are what the builder read (the output may not overlap them). Returns the final meta dict.
    """
    if split_rule not in ("patient", "literature"):
        raise SettingsError(f"split rule must be 'patient' or 'literature', got {split_rule!r}")
    out = check_output(out, force, inputs, tool)
    chunks = [c for c in chunks if c.n > 0]
    if not chunks:
        raise InputError("no slice with a non-empty mask: nothing to write")
    with OutputFolder(out, force, inputs=inputs, tool=tool) as tmp:  # the one writer: nothing under out until whole
        return _write_into(tmp, chunks, meta, seed, splits, split_rule)


def warn_small_splits(out) -> None:
    """After a builder wrote the data set at ``out``: one ``warning:`` line for each split of fewer than two
    patients (or series), whose scores and bootstrap intervals would rest on one patient, or that holds none.
    The builders' command lines call it (make_phantom.py, prepare_lidc.py, import_pickle.py, subsample.py)."""
    splits = _read_json(Path(out) / "splits.json")
    unit = "series" if splits.get("unit") == "series_uid" else "patient"
    for part in ("train", "val", "test"):
        members = splits[part]
        if len(members) == 0:
            guards.warn(f"data set {out}: the {part} split holds no {unit}; nothing can be trained or scored on it")
        elif len(members) == 1:
            guards.warn(f"data set {out}: the {part} split holds only one {unit} ({members[0]}); its scores and "
                        f"their bootstrap intervals rest on that one {unit}")


def _write_into(tmp: Path, chunks: Sequence, meta: dict, seed: int, splits: Optional[dict] = None,
                split_rule: str = "patient") -> dict:
    first = chunks[0].load()
    total = sum(c.n for c in chunks)
    height, width = first.images.shape[1:]
    open_memmap = np.lib.format.open_memmap
    images = open_memmap(tmp / "images.npy", "w+", first.images.dtype, (total, height, width))
    masks = open_memmap(tmp / "masks.npy", "w+", bool, (total, N_READERS, height, width))
    present = open_memmap(tmp / "reader_present.npy", "w+", bool, (total, N_READERS))
    # neighbours.npy only when every chunk has them (a work directory of an older build may not)
    with_neighbours = all(getattr(c, "has_neighbours", False) for c in chunks)
    neighbours = open_memmap(tmp / "neighbours.npy", "w+", first.images.dtype, (total, 2, height, width)) \
        if with_neighbours else None
    rows, start = [], 0
    for ref in chunks:
        chunk = ref.load()
        stop = start + chunk.n
        images[start:stop], masks[start:stop] = chunk.images, chunk.masks
        present[start:stop] = chunk.present
        if neighbours is not None:
            neighbours[start:stop] = chunk.neighbours
        rows += [dict(r, index=start + i) for i, r in enumerate(chunk.rows)]
        start = stop
    arrays = [a for a in (images, masks, present, neighbours) if a is not None]
    for array in arrays:
        array.flush()
    del images, masks, present, neighbours, arrays
    _write_csv(tmp / "slices.csv", rows)
    present_ids = {r["patient_id"] for r in rows}
    if splits is not None:
        splits = dict(splits, **{part: [p for p in splits[part] if p in present_ids]
                                 for part in ("train", "val", "test")})
        if present_ids - set(splits["train"] + splits["val"] + splits["test"]):
            raise InputError("the given split does not cover every patient of the data set")
    elif split_rule == "literature":
        splits = literature_splits(r["series_uid"] for r in rows)
    else:
        splits = make_splits(present_ids, seed)
    (tmp / "splits.json").write_text(json.dumps(splits, indent=1), encoding="utf-8")
    meta = dict(meta, format=FORMAT, version=VERSION, crop=[int(height), int(width)],
                dtype=str(first.images.dtype), created=datetime.now(timezone.utc).isoformat(
                    timespec="seconds"), **_counts(rows))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return meta


def _parse(name: str, value: str):
    if name in _INT_COLUMNS:
        return int(value) if value not in ("", "False", "True") else int(value == "True")
    if name in _FLOAT_COLUMNS:
        return float(value) if value else float("nan")
    return value


class SliceDataset:
    """A data set opened read-only: arrays memory-mapped, the slice table in memory.

    images (S, H, W), masks (S, 4, H, W), present (S, 4) cover the whole data set; `indices` are the
    slice indices of the selected split (all slices when split is None); len() and [] use them.
    """

    def __init__(self, path, split: Optional[str] = None):
        self.path = Path(path)
        if not (self.path / "meta.json").is_file():
            raise InputError(f"{self.path} is not a data set (no meta.json)")
        self.meta = _read_json(self.path / "meta.json")
        if not isinstance(self.meta, dict) or self.meta.get("format") != FORMAT \
                or not isinstance(self.meta.get("version", 0), int) or self.meta.get("version", 0) > VERSION:
            found = self.meta.get("format") if isinstance(self.meta, dict) else None
            raise InputError(f"{self.path}: not a data set of format {FORMAT} v{VERSION} (found {found!r})")
        self.splits = _read_json(self.path / "splits.json")
        self.images, self.masks, self.present = (_read_array(self.path / name) for name in
                                                 ("images.npy", "masks.npy", "reader_present.npy"))
        has_neighbours = (self.path / "neighbours.npy").is_file()
        self.neighbours = _read_array(self.path / "neighbours.npy") if has_neighbours else None
        try:
            with open(self.path / "slices.csv", newline="", encoding="utf-8") as fh:
                records = list(csv.DictReader(fh))
            self.table = {name: np.array([_parse(name, r[name]) for r in records])
                          for name in (records[0].keys() if records else COLUMNS)}
        except (OSError, ValueError, KeyError, TypeError, csv.Error) as error:
            raise InputError(f"{self.path / 'slices.csv'} is missing or damaged ({error}); rebuild the data "
                             f"set") from None
        _check_consistent(self, len(records))
        self.split = split
        if split is None:
            self.indices = np.arange(len(records))
        elif split in ("train", "val", "test"):
            chosen = set(self.splits[split])
            unit = "series_uid" if self.splits.get("unit") == "series_uid" else "patient_id"
            in_split = [p in chosen for p in self.table[unit]]
            self.indices = np.nonzero(np.array(in_split, dtype=bool))[0]
        else:
            raise ValueError(f"split must be train, val, test or None, not {split!r}")

    @property
    def intensity(self) -> str:
        return self.meta["intensity"]

    @property
    def patient_ids(self) -> np.ndarray:
        return self.table["patient_id"][self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        index = int(self.indices[i])
        return {"image": np.asarray(self.images[index]), "masks": np.asarray(self.masks[index]),
                "present": np.asarray(self.present[index]), "intensity": self.intensity,
                "patient_id": str(self.table["patient_id"][index]), "index": index}


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InputError(f"{path} is missing or damaged ({error}); rebuild the data set") from None


def _read_array(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as error:  # a cut .npy: "mmap length is greater than file size"
        raise InputError(f"{path} is missing, truncated or damaged ({error}); rebuild the data set") from None


def _check_consistent(dataset: "SliceDataset", n_rows: int) -> None:
    """Every array and the slice table describe the same slices, as meta.json counts them."""
    expected = dataset.meta.get("n_slices", n_rows)
    shapes = {"images.npy": dataset.images.shape, "masks.npy": dataset.masks.shape,
              "reader_present.npy": dataset.present.shape}
    wrong = [f"{name} {shape}" for name, shape in shapes.items() if not shape or shape[0] != expected]
    if dataset.masks.ndim != 4 or dataset.images.ndim != 3 or dataset.masks.shape[2:] != dataset.images.shape[1:]:
        wrong.append(f"images {dataset.images.shape} vs masks {dataset.masks.shape}")
    if dataset.neighbours is not None and dataset.neighbours.shape != (expected, 2) + dataset.images.shape[1:]:
        wrong.append(f"neighbours.npy {dataset.neighbours.shape}")
    if n_rows != expected:
        wrong.append(f"slices.csv {n_rows} rows")
    if wrong:
        raise InputError(f"{dataset.path} is incomplete: meta.json counts {expected} slices but "
                         f"{', '.join(wrong)}; rebuild the data set")
    if not isinstance(dataset.splits, dict) or not all(isinstance(dataset.splits.get(k), list)
                                                        for k in ("train", "val", "test")):
        raise InputError(f"{dataset.path / 'splits.json'} does not list train, val and test patients")


def load_dataset(path, split: Optional[str] = None) -> SliceDataset:
    """Open a data set directory, optionally restricted to the 'train', 'val' or 'test' patients."""
    return SliceDataset(path, split)


def load_split(data, split: str) -> SliceDataset:
    """A split a script was told to read, with InputError for a missing, foreign or incomplete data set and for
    an empty split (the message says how to build one)."""
    if not Path(data, "meta.json").is_file():
        raise InputError(f"{data} is not a data set (no meta.json); build one with Training/data/make_phantom.py "
                         f"or Training/data/prepare_lidc.py")
    dataset = load_dataset(data, split)
    if len(dataset) == 0:
        raise InputError(f"the {split} split of {data} holds no slices")
    return dataset
