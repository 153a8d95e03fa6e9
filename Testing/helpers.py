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
