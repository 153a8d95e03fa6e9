"""Helpers of the ProbSAMSlicer module, kept out of ProbSAMSlicer.py so that each part stays short.

roi_geometry: Markups ROI (+ parent transforms) -> ProbSAMLib voxel box. dependencies: checking and
installing torch and the other packages on first use. outputs: building the MRML nodes from numpy
results. jobs: the worker thread that runs ProbSAMLib.volume.sample_volume.

Nothing here imports torch at import time: Slicer imports every module at start-up.
"""
