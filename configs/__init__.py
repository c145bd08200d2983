"""The YAML configs, shipped as package data: in an installed (non-editable) package they sit
beside this file, and ``train.config.find_config`` finds them by name (``--config demo.yaml``)."""
