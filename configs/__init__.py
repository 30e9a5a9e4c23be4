"""ml_collections configs: `base.py` holds every field, the other files are thin variants."""
