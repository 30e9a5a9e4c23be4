"""segchange_jax: JAX/Flax SegChange-R1, text-prompted remote-sensing change detection."""

__version__ = '0.1.0'

__all__ = ['ChangeDetector']


def __getattr__(name):
  # Lazy: `import segchange_jax` must not import jax (CLIs set platform flags first).
  if name == 'ChangeDetector':
    from segchange_jax.api import ChangeDetector  # pylint: disable=g-import-not-at-top
    return ChangeDetector
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
