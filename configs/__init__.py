"""The YAML configs, shipped as package data: in an installed (non-editable) package they sit
beside this file, ``importlib.resources.files("configs") / "demo.yaml"``."""
