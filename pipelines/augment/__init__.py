"""The SimCLR augmentation: the recipe (``recipe``) and its implementations.

- ``reference``: torchvision transforms, the reference the others are checked against;
- ``batched``: per-sample colour ops on batches of device tensors (GPU side of FFCV);
- ``dali``: the recipe as a DALI graph (imports nvidia.dali);
- ``ffcv_colour``: the colour part as a numba FFCV operation (imports ffcv).
"""
