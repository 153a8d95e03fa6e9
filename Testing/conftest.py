"""Suite-wide settings, read by pytest before any test module.

Every child process the tests start (the Slicer worker, `probsam`, `probsam serve`, torchrun ranks, Training
scripts) runs torch on one thread, as the test processes themselves do (most test modules call
torch.set_num_threads(1)): two pytest-xdist workers on a 2-core machine already fill it, and children with
a thread per core would only contend. A test that needs another count sets it itself.
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
