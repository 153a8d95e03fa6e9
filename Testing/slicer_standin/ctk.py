"""MOCK of Slicer's ``ctk`` module (slicer-core has no Qt): ProbSAMSlicer does not call it directly; the
.ui's ctk widgets are created by Slicer's UI loader."""
