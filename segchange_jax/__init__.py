"""segchange_jax: JAX/Flax SegChange-R1, text-prompted remote-sensing change detection.

Layers (docs/architecture.md: what each may import, and the data flow):
- base: `config_lib` + `default_config` (every config field, validated once), `cli` (one
  error path for every command), `atomic` (outputs that never destroy a file), `paths`
  (local / gs:// run dirs), `jax_compat` (the only private-JAX access).
- `models/`: the Flax model, stage by stage. `text/`: text encoders and prompt embeddings.
- `data/`: raw layouts -> ArrayRecord shards -> Grain pipeline.
- `interop/`: PyTorch files and rules, Hugging Face Hub, pretrained backbones.
- `train/`: train step, loop, losses, metrics, optimizer, sharding, checkpoints.
- `inference/`: predictor (`ChangeDetector`), sliding window, raster I/O, vectors, export.
- `app/`: the browser app (`python -m segchange_jax.app`).
- commands (thin `main`s over the above): `python -m segchange_jax.train` (train/__main__.py),
  `.evaluate`, `.infer`, `.export`, `.convert_torch`, `.embed_prompts`.
"""

__version__ = '0.1.0'

__all__ = ['ChangeDetector']


def __getattr__(name):
  # Lazy: `import segchange_jax` must not import jax (CLIs set platform flags first).
  if name == 'ChangeDetector':
    from segchange_jax.inference.predictor import ChangeDetector  # pylint: disable=g-import-not-at-top
    return ChangeDetector
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
