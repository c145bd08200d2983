"""What every config section shares: the error that names a bad key."""
from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid."""
