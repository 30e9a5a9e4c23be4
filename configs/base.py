"""Base configuration for the variants in this folder: segchange_jax.default_config.

The schema and defaults live in the library, so an installed segchange_jax can rebuild the
config of any checkpoint; this module keeps `from configs import base; base.get_config()`
working for experiment files.
"""

from segchange_jax.default_config import get_config

__all__ = ['get_config']
