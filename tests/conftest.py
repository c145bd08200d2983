import os

# Keep every test process to the machine's cores and off any GPU-only path.
os.environ.setdefault("OMP_NUM_THREADS", "2")
