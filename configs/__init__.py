"""The shipped YAML configs (package data, so that an installed package finds them:
``train.config.find_config``)."""
