"""ImageFolder -> FFCV / DALI conversion pieces used by ``tools.convert_imagenet``."""
