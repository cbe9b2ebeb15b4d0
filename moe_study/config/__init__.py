"""The params.yaml schema (schema.py) and its loading and validation (load.py)."""
