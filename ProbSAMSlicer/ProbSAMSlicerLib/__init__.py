"""Helpers of the ProbSAMSlicer module, kept out of ProbSAMSlicer.py so that each part stays short.

roi_geometry: Markups ROI (+ parent transforms) -> ProbSAMLib voxel box. dependencies: checking and
installing torch and the other packages on first use. outputs: building the MRML nodes from the
box-sized results. sampling_process: the worker process (ProbSAMLib.app.worker) that samples, its
progress, cancel and errors.

Nothing here imports torch at import time: Slicer imports every module at start-up.
"""
