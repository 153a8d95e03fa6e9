"""Small builders shared by several test modules (not tests themselves)."""
import hashlib
import os
from pathlib import Path
from typing import Optional

import numpy as np
import SimpleITK as sitk


def rotation(axis: int, degrees: float) -> np.ndarray:
    """3x3 rotation by ``degrees`` about index axis ``axis`` (0, 1 or 2)."""
    c, s = np.cos(np.deg2rad(degrees)), np.sin(np.deg2rad(degrees))
    i, j = [a for a in range(3) if a != axis]
    m = np.eye(3)
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    return m


def write_dicom_series(folder, values, uid: str, prefix: str, description: Optional[str] = None,
                       study_uid: str = "1.2.3.4.5") -> None:
    """A CT series, one file per slice, written with SimpleITK (origin (0, 0, 0), spacing .8/.8/2.5)."""
    image = sitk.GetImageFromArray(values.astype(np.int16))
    image.SetSpacing((0.8, 0.8, 2.5))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(values.shape[0]):
        piece = image[:, :, k]
        tags = [("0008|0060", "CT"), ("0020|000d", study_uid), ("0020|000e", uid),
                ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0020|0013", str(k + 1)), ("0008|0018", f"{uid}.{k + 1}"),
                ("0018|0050", "2.5"),
                ("0020|0032", "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, k)))))]
        if description is not None:
            tags.append(("0008|103e", description))
        for tag, value in tags:
            piece.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{prefix}{k:03d}.dcm"))
        writer.Execute(piece)


def snapshot(folder: Path) -> dict:
    """Every path under ``folder`` -> a hash of its contents ('dir' for folders, the target for links):
    equal snapshots before and after a run mean nothing was created, changed or removed."""
    state = {}
    for path in sorted(Path(folder).rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            state[key] = "link:" + os.readlink(path)
        elif path.is_dir():
            state[key] = "dir"
        else:
            state[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def diverse_tiny_model(seed: int = 0):
    """A tiny ProbSAM (random weights) whose samples differ: the latent projection, zero at start so an
    untrained model equals SAM, gets random weights."""
    import torch

    from ProbSAMLib import ProbSAMConfig, build_probsam

    model = build_probsam(ProbSAMConfig.preset("tiny"), seed=seed)
    torch.manual_seed(1)
    torch.nn.init.normal_(model.latent_projection.mlp[-1].weight, std=0.5)
    return model


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
