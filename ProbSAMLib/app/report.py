"""The output folder of a volume sampling run: samples.seg.nrrd, the uncertainty volumes and summary.json (what
goes into the summary is ProbSAMLib.inference.summary; the PNG montage is app.montage).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ProbSAMLib.inference.summary import segment_names
from ProbSAMLib.inference.uncertainty import MAP_NAMES
from ProbSAMLib.io import imageio, segfile


def write_outputs(result, directory, split: bool = False, extra_summary: Optional[dict] = None,
                  tags: Optional[Sequence[dict]] = None, other_files: Sequence[str] = ()) -> list:
    """Write a VolumeSamplingResult into ``directory`` (a folder being filled: io.outputdir.OutputFolder);
    returns the paths.

    samples.seg.nrrd (N overlapping segments), the four uncertainty volumes, summary.json, and with
    ``split`` also sample_00.nrrd, sample_01.nrrd, ... All on the input's full grid (the result's
    box-sized arrays are placed there). ``other_files``: names the caller writes into the folder too,
    listed in the summary's "files".
    """
    directory = Path(directory)
    count = len(result.masks)
    masks = result.on_full_grid("masks")
    paths = [segfile.write_segmentation(masks, result.geometry, directory / "samples.seg.nrrd",
                                        names=segment_names(count), tags=tags)]
    if split:
        paths += imageio.write_sample_files(masks, result.geometry, directory)
    del masks
    for name in MAP_NAMES:
        paths.append(imageio.write_image(result.on_full_grid(name), result.geometry, directory / f"{name}.nrrd",
                                         np.float32))
    summary = dict(result.summary, **(extra_summary or {}))
    summary["files"] = sorted([p.name for p in paths] + list(other_files) + ["summary.json"])
    paths.append(write_json(summary, directory / "summary.json"))
    return paths


def write_json(data: dict, path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path
