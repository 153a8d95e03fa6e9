"""STAND-IN for Slicer's ``ctk`` module (a mock): ProbSAMSlicer does not call it directly; the .ui's
ctk widgets are created by Slicer's UI loader."""
