"""The converted dataset format: what ``tools.convert_imagenet`` writes and the
loaders read, defined once.

- ``layout``: where each file lives in a conversion and readers for its small files;
- ``manifest``: file records with sizes and checksums, atomic JSON writes;
- ``converted``: ``open_converted``, the one reader of a converted split.
"""
