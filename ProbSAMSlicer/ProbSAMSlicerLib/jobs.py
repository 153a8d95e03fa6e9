"""Running ProbSAMLib.volume.sample_volume for every ROI, in the caller's thread or on a worker thread.

Only numpy arrays and ProbSAMLib's plain geometry objects cross the thread boundary: the main thread
copies the volume array and computes the voxel boxes before the worker starts; the worker never touches
MRML or Qt. Its progress, result and error are read back by the main thread (the widget polls them with a
QTimer). Cancel sets an Event that sample_volume's ``cancel`` callback reads between slice chunks.
"""

import threading
from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass(frozen=True)
class SamplingSettings:
    numberOfSamples: int = 16
    seed: Optional[int] = 0
    model: str = "demo"
    checkpointPath: str = ""
    samCheckpointPath: str = ""
    device: str = "auto"
    uncertaintyKind: str = "entropy"


@dataclass(frozen=True)
class SamplingRequest:
    """One ROI to sample: its name (for the outputs) and its voxel box in the volume."""

    roiName: str
    voxelBox: object  # ProbSAMLib.geometry.VoxelBox


class ModelCache:
    """The last loaded model, reused while the model settings do not change (loading SAM takes seconds)."""

    def __init__(self):
        self._key, self._model = None, None

    def get(self, settings: SamplingSettings):
        from ProbSAMLib.build import load_model

        key = (settings.model, settings.checkpointPath, settings.samCheckpointPath, settings.device)
        if key != self._key:
            self._key, self._model = None, None  # free the old model before loading the new one
            self._model = load_model(settings.model, checkpoint=settings.checkpointPath or None,
                                     sam_checkpoint=settings.samCheckpointPath or None, device=settings.device)
            self._key = key
        return self._model


def run_sampling(volume: np.ndarray, geometry, requests: list, settings: SamplingSettings, models: ModelCache,
                 progress=None, cancel=None) -> list:
    """Per request a dict of numpy results: masks (N, K, J, I), the chosen uncertainty map, summary.

    progress(fraction, message) covers the whole run; Cancelled propagates (no partial results).
    """
    from ProbSAMLib.volume import Cancelled, sample_volume

    report = progress or (lambda fraction, message: None)
    report(0.0, f"loading model {settings.model}")
    model = models.get(settings)
    if cancel is not None and cancel():
        raise Cancelled("sampling was cancelled")
    results = []
    for index, request in enumerate(requests):
        def roi_progress(fraction, message, index=index, name=request.roiName):
            report((index + fraction) / len(requests), f"{name}: {message}")

        result = sample_volume(model, volume, geometry, request.voxelBox, n_samples=settings.numberOfSamples,
                               seed=settings.seed, progress=roi_progress, cancel=cancel)
        results.append({"masks": result.masks, settings.uncertaintyKind: getattr(result, settings.uncertaintyKind),
                        "summary": result.summary})
    return results


class SamplingJob:
    """run_sampling on a daemon thread; poll ``done`` / ``progress()`` from the main thread."""

    def __init__(self, volume, geometry, requests, settings, models):
        self._args = (volume, geometry, requests, settings, models)
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._progress = (0.0, "starting")
        self.results, self.error = None, None
        self._thread = threading.Thread(target=self._run, name="ProbSAMSampling", daemon=True)

    def start(self) -> "SamplingJob":
        self._thread.start()
        return self

    def _report(self, fraction: float, message: str) -> None:
        with self._lock:
            self._progress = (float(fraction), str(message))

    def _run(self) -> None:
        try:
            self.results = run_sampling(*self._args, progress=self._report, cancel=self._cancel.is_set)
        except BaseException as error:  # handed to the main thread, which reports it
            self.error = error

    def progress(self) -> tuple:
        with self._lock:
            return self._progress

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return not self._thread.is_alive() and (self.results is not None or self.error is not None)

    def wait(self, timeout: Optional[float] = None) -> bool:
        self._thread.join(timeout)
        return self.done
