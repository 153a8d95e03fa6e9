"""Import the widely used preprocessed LIDC pickle (the Probabilistic U-Net / PHiSeg set).

    python Training/data/import_pickle.py data_lidc.pickle --out data/lidc_pickle
    python Training/data/import_pickle.py data_lidc.pickle --out data/lidc_literature --split literature

The pickle is a dict keyed by slice name (they begin with the patient ID, "LIDC-IDRI-dddd_..."),
each value {'image': 128 x 128 float in [0, 1], 'masks': 4 x (128 x 128) binary, 'series_uid': str}.
It becomes a data set in the common format (docs/TRAINING.md) with "intensity": "unit": the
images are kept as they are (float32), not converted back to HU. The pickle does not say which
readers annotated a nodule at all, so every reader slot is marked present and an empty mask counts
as that reader's "no nodule here" (M = 4 on every slice, as the literature evaluates it).

Splits: by default the project's seeded patient split, slices without any mask left out. With
``--split literature`` the split of the published LIDC tables (PHiSeg / MoSE): scikit-learn's
train_test_split(test_size=0.2, random_state=0) on the sorted unique series UIDs, twice (64/16/20), and
every slice kept, empty ones included (n_marked = 0; evaluate.py counts them and leaves them out of the
box-prompted metrics, since there is no object to draw a box around).
"""
from __future__ import annotations

import argparse
import pickle
import re
import sys
from pathlib import Path
from typing import Mapping, Optional

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from ProbSAMLib.errors import InputError, SettingsError, run_main  # noqa: E402
from ProbSAMLib.io.outputdir import parser_inputs  # noqa: E402
from Training import guards  # noqa: E402
from Training.data.dataset_format import N_READERS, Chunk, check_output, warn_small_splits, write_dataset  # noqa: E402

_PATIENT = re.compile(r"LIDC-IDRI-\d+")
_SLICE = re.compile(r"[_-]?slice[_-]?(\d+)", re.IGNORECASE)


# What the LIDC pickle may contain: numpy arrays and scalars (plus the codec numpy uses for their bytes
# under protocol 2, and under protocol 5, pickle.HIGHEST_PROTOCOL, numpy's _frombuffer, which only views
# bytes as an array of a dtype: an object dtype is refused by numpy itself); dicts, lists, strings and
# numbers need no lookup at all. Anything else is refused before it is built, so a crafted file cannot run
# code. numpy 2 writes numpy._core, numpy 1 numpy.core.
_ALLOWED_GLOBALS = {
    (f"{package}.{module}", name) for package in ("numpy.core", "numpy._core")
    for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))
} | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise InputError(f"the pickle wants to create {module}.{name}; only numpy arrays, dicts, lists, "
                             f"strings and numbers are read (a file asking for more may run code)")
        return super().find_class(module, name)


def load_lidc_pickle(path) -> dict:
    """Read the pickle with a restricted unpickler (numpy arrays, dicts, lists, strings, numbers only)."""
    try:
        with open(path, "rb") as fh:
            data = _RestrictedUnpickler(fh).load()
    except InputError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as error:
        raise InputError(f"{path} is not a readable pickle (empty, truncated or another format): "
                         f"{error or type(error).__name__}") from None
    if not isinstance(data, Mapping):
        raise InputError(f"{path}: expected a dict of slices, got {type(data).__name__}")
    return data


def _entry_arrays(key, entry) -> tuple:
    """(image (H, W) float32, masks (4, H, W) bool) of one slice entry, or InputError naming the key."""
    if not isinstance(entry, Mapping) or "image" not in entry or "masks" not in entry:
        raise InputError(f"slice {key!r}: expected a dict with 'image' and 'masks', got {type(entry).__name__}")
    try:
        image = np.asarray(entry["image"], dtype=np.float32)
        masks = np.stack([np.asarray(m, dtype=np.float32) > 0.5 for m in entry["masks"]])
    except (TypeError, ValueError) as error:
        raise InputError(f"slice {key!r}: image or masks are not numeric arrays of one size ({error})") from None
    if image.ndim != 2 or masks.ndim != 3:
        raise InputError(f"slice {key!r}: image {image.shape} must be 2D and masks {masks.shape} a stack of 2D masks")
    if not np.isfinite(image).all():
        raise InputError(f"slice {key!r}: the image holds NaN or infinite values")
    return image, masks


def _ids(key: str, series_uid: str):
    """(patient_id, nodule_id, slice number or -1) parsed from a slice key, best effort."""
    match = _PATIENT.search(key)
    patient = match.group(0) if match else series_uid  # fall back to the series: still no leak
    slice_match = _SLICE.search(key)
    nodule = _SLICE.sub("", key) if slice_match else f"{patient}_{series_uid}"
    return patient, nodule, int(slice_match.group(1)) if slice_match else -1


def pickle_chunk(data: Mapping, keep_empty: bool = False) -> tuple:
    """(Chunk, number of slices dropped because every mask is empty), keys in sorted order.
    keep_empty: keep those slices too (the literature split counts them)."""
    if not data:
        raise InputError("the pickle holds no slices (an empty dict)")
    keys = sorted(data, key=str)
    images, masks, rows, dropped = [], [], [], 0
    for key in keys:
        entry = data[key]
        image, slice_masks = _entry_arrays(key, entry)
        if slice_masks.shape[0] != N_READERS:
            raise InputError(f"slice {key!r}: {slice_masks.shape[0]} masks, expected {N_READERS}")
        if not slice_masks.any() and not keep_empty:
            dropped += 1
            continue
        if image.shape != slice_masks.shape[1:]:
            raise InputError(f"slice {key!r}: image {image.shape} vs masks {slice_masks.shape[1:]}")
        series = str(entry.get("series_uid", ""))
        patient, nodule, number = _ids(str(key), series)
        images.append(image)
        masks.append(slice_masks)
        rows.append({"patient_id": patient, "series_uid": series, "scan_id": -1,
                     "nodule_id": nodule, "k": number, "z_mm": float("nan"),
                     "crop_row0": -1, "crop_col0": -1,
                     "n_readers": N_READERS, "n_marked": int(slice_masks.any(axis=(1, 2)).sum()),
                     "truncated": 0, "source_key": str(key)})
    if not rows:
        raise InputError("the pickle holds no slice" + ("" if keep_empty else " with a non-empty mask"))
    present = np.ones((len(rows), N_READERS), dtype=bool)
    return Chunk(np.stack(images), np.stack(masks), present, rows), dropped


TOOL = "import_pickle.py"  # in the data set's marker: only this script's --force replaces it


def import_pickle(pickle_path, out, seed: int = 0, force: bool = False,
                  data: Optional[Mapping] = None, split: str = "patient") -> dict:
    """Convert the pickle at `pickle_path` (or an already loaded `data` dict) into a data set.

    split: "patient" (seeded patient split, empty slices dropped) or "literature" (see the module doc)."""
    if split not in ("patient", "literature"):
        raise SettingsError(f"split must be 'patient' or 'literature', got {split!r}")
    inputs = [pickle_path] if pickle_path is not None else []
    check_output(out, force, inputs, TOOL)
    data = load_lidc_pickle(pickle_path) if data is None else data
    chunk, dropped = pickle_chunk(data, keep_empty=split == "literature")
    value_range = (float(chunk.images.min()), float(chunk.images.max()))
    if value_range[0] < -1e-3 or value_range[1] > 1 + 1e-3:
        raise InputError(f"pickle images span {value_range}, expected [0, 1]")
    meta = {"source": "lidc-pickle", "intensity": "unit", "pickle": str(pickle_path), "split_rule": split,
            "dropped_empty_slices": dropped}
    return write_dataset(out, [chunk], meta, seed=seed, force=force, split_rule=split, tool=TOOL, inputs=inputs)


def main(argv=None) -> int:
    return run_main("import_pickle.py", lambda: _main(argv))


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pickle", type=Path, help="the LIDC pickle (e.g. data_lidc.pickle)")
    parser.add_argument("--out", required=True, type=Path, help="output data set directory")
    parser.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    parser.add_argument("--force", action="store_true", help="replace an existing data set")
    parser.add_argument("--split", choices=["patient", "literature"], default="patient",
                        help="patient: seeded patient split, empty slices dropped (default); literature: the "
                             "published tables' split (train_test_split random_state=0 on series UIDs), every "
                             "slice kept")
    args = parser.parse_args(argv)
    guards.existing_file("pickle", args.pickle)
    check_output(args.out, args.force, parser_inputs(parser, args), TOOL)  # every path option is an input
    guards.at_least("--seed", args.seed, 0)
    meta = import_pickle(args.pickle, args.out, args.seed, args.force, split=args.split)
    print(f"wrote {args.out}: {meta['n_slices']} slices, {meta['n_patients']} patients "
          f"({meta['dropped_empty_slices']} slices without any mask left out)")
    warn_small_splits(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
