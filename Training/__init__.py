"""Training tools for ProbSAMSlicer: data sets (phantom, LIDC DICOM, LIDC pickle) and training."""
