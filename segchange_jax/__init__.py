"""segchange_jax: JAX/Flax SegChange-R1, text-prompted remote-sensing change detection."""

__version__ = '0.1.0'
