"""PyTorch view of an on-disk slice data set (Training/data/dataset_format.py)."""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
from torch.utils.data import Dataset

from Training.data.dataset_format import SliceDataset


class LIDCSlices(Dataset):
    """One item a stored slice, as numpy (the default collate turns them into tensors):

    image:      (H, W) float32, raw HU or [0, 1] as `intensity` says (windowing is the model's job)
    masks:      (4, H, W) bool, reader slots; absent readers are empty
    present:    (4,) bool, which slots hold a real reader
    intensity:  "hu" or "unit"
    patient_id: str;  index: int, the slice's row in slices.csv

    split: "train", "val", "test" or None (all). `transform`, if given, maps the item dict to a new
    one (augmentation, prompt boxes, ...).
    """

    def __init__(self, root, split: Optional[str] = "train",
                 transform: Optional[Callable[[dict], dict]] = None):
        self.data = SliceDataset(root, split)
        self.transform = transform

    @property
    def intensity(self) -> str:
        return self.data.intensity

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        item = self.data[i]
        item["image"] = item["image"].astype(np.float32)
        return self.transform(item) if self.transform else item
