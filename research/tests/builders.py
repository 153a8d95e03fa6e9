"""Small data builders shared by the research tools' tests (not tests themselves)."""
from pathlib import Path

import numpy as np


def faint_or_dense_slice(rng, faint: bool, size: int = 48):
    """A faint, wide blob (-700 HU) or a dense, small one (-50 HU) in noisy lung, and its 4 slot masks."""
    image = rng.normal(-850, 20, (size, size))
    yy, xx = np.mgrid[:size, :size]
    radius = 12 if faint else 5
    blob = (yy - size // 2) ** 2 + (xx - size // 2) ** 2 <= radius ** 2
    image[blob] = -700 if faint else -50
    return image.astype(np.int16), blob


def faint_and_dense_dataset(out, faint_slots_by_split, seed=0):
    """A data set of 20 patients (12 train, 3 val, 5 test), 4 faint and 4 dense slices each (case column
    "faint" / "dense"). Dense blobs: all 4 slots drew them. Faint ones: as many slots as
    faint_slots_by_split[split] (1: the slot majority is empty; 4: it is not)."""
    from Training.data.dataset_format import N_READERS, Chunk, write_dataset

    splits = {"seed": 0, "fractions": [0.64, 0.16, 0.2], "unit": "patient",
              "train": [f"P{i:02d}" for i in range(12)], "val": [f"P{i:02d}" for i in range(12, 15)],
              "test": [f"P{i:02d}" for i in range(15, 20)]}
    where = {p: s for s in ("train", "val", "test") for p in splits[s]}
    rng = np.random.default_rng(seed)
    images, masks, rows = [], [], []
    for p in range(20):
        patient = f"P{p:02d}"
        for k in range(8):
            faint = k % 2 == 0
            image, blob = faint_or_dense_slice(rng, faint)
            slots = faint_slots_by_split[where[patient]] if faint else N_READERS
            stack = np.zeros((N_READERS,) + blob.shape, bool)
            stack[:slots] = blob
            images.append(image)
            masks.append(stack)
            rows.append({"patient_id": patient, "series_uid": f"1.{p}", "scan_id": p, "nodule_id": f"{patient}_n0",
                         "k": k, "z_mm": float(k), "crop_row0": 0, "crop_col0": 0, "n_readers": N_READERS,
                         "n_marked": slots, "truncated": 0, "source_key": "", "case": "faint" if faint else "dense"})
    n = len(rows)
    write_dataset(out, [Chunk(np.stack(images), np.stack(masks), np.ones((n, N_READERS), bool), rows)],
                  {"source": "test", "intensity": "hu"}, splits=splits)
    return out


def write_per_slice_table(path, method: str, dataset, dice_majority) -> None:
    """An evaluate.py per-slice CSV for every slice of `dataset` (a load_dataset split) with the given Dice
    of the mean against the majority (one value a slice); the other metrics are left out."""
    from Training.evaluation.report import write_per_slice

    table = dataset.table
    rows = [{"position": p, "slice": int(i), "n_marked": int(table["n_marked"][i]),
             "patient_id": str(table["patient_id"][i]), "series_uid": "", "case": str(table["case"][i]),
             "dice_majority": float(d), "calibration_bins": np.zeros((3, 10))}
            for p, (i, d) in enumerate(zip(dataset.indices, dice_majority))]
    write_per_slice(Path(path), method, rows, 0, "", "abc")
