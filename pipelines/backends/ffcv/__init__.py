"""FFCV backend: ``loader`` (the PretrainLoader), ``orders`` (schedule-driven
FFCV orders and a fail-fast pass), ``decode`` (a crop decoder that raises on
JPEG errors), ``fixes`` (two parts of FFCV's Loader replaced: an OS-cache reader
that leaves numba's shared types alone, and a graph that runs its operations in a
fixed order). Importing any of them imports ffcv."""
