"""Loader backends: each turns the shared sample plan (``pipelines.plan``) into
``PretrainBatch`` tensors, fast, and does nothing else.

- ``torch``: torchvision + DataLoader workers (the reference);
- ``dali``: NVIDIA DALI graph, GPU decode and augmentation when CUDA is present;
- ``ffcv``: FFCV ``.beton`` loaders (package: ``loader``, ``orders``, ``decode``).

``pipelines.build`` imports the one that ``LoaderSpec.backend`` names, lazily,
since DALI and FFCV are optional dependencies.
"""
