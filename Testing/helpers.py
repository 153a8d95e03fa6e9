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


def tiny_dataset(out: Path, n: int = 30, size: int = 64, patients: int = 6, tool: str = "make_phantom.py") -> Path:
    """A tiny synthetic slice data set (no pylidc): ``n`` slices of -800 HU noise, every reader marking the
    same square, spread over ``patients`` patients; written as ``tool`` writes one (its output marker)."""
    from Training.data.dataset_format import N_READERS, Chunk, write_dataset

    rng = np.random.default_rng(0)
    images = rng.normal(-800, 40, (n, size, size)).astype(np.int16)
    masks = np.zeros((n, N_READERS, size, size), bool)
    masks[:, :, 20:40, 22:42] = True
    rows = [{"patient_id": f"LIDC-IDRI-{i % patients:04d}", "series_uid": f"1.{i % patients}",
             "scan_id": i % patients, "nodule_id": f"n{i % patients}", "k": i, "z_mm": float(i), "crop_row0": 0,
             "crop_col0": 0, "n_readers": N_READERS, "n_marked": N_READERS, "truncated": 0, "source_key": str(i)}
            for i in range(n)]
    write_dataset(out, [Chunk(images, masks, np.ones((n, N_READERS), bool), rows)],
                  {"source": "test", "intensity": "hu"}, tool=tool)
    return out
