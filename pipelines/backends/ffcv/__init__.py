"""FFCV backend: ``loader`` (the PretrainLoader), ``orders`` (schedule-driven
FFCV orders and a fail-fast pass), ``decode`` (a crop decoder that raises on
JPEG errors), ``memory`` (FFCV's OS-cache reader, leaving numba's shared types
alone). Importing any of them imports ffcv."""
