"""Mesh construction from config.mesh and the FSDP parameter rule."""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import pytest

from segchange_jax.train import sharding
from tests.train.traincore_toy import toy_config


def _cfg(data, fsdp, min_size=64):
  c = toy_config()
  with c.unlocked():
    c.mesh.data, c.mesh.fsdp, c.mesh.fsdp_min_size = data, fsdp, min_size
  return c


@pytest.mark.parametrize('data,fsdp,want', [(-1, 1, (8, 1)), (2, -1, (2, 4)), (-1, 4, (2, 4)),
                                            (8, 1, (8, 1)), (1, 8, (1, 8))])
def test_mesh_shapes(data, fsdp, want):
  assert jax.device_count() == 8
  mesh = sharding.create_mesh(_cfg(data, fsdp))
  assert (mesh.shape['data'], mesh.shape['fsdp']) == want


def test_mesh_errors_name_the_fields():
  with pytest.raises(ValueError, match=r'config.mesh.data=4 x config.mesh.fsdp=4'):
    sharding.create_mesh(_cfg(4, 4))
  with pytest.raises(ValueError, match=r'config.mesh.fsdp=3'):
    sharding.create_mesh(_cfg(-1, 3))
  one = sharding.create_mesh(_cfg(-1, 1), devices=jax.devices()[:1])
  assert one.devices.shape == (1, 1)


def test_param_rule_shards_largest_divisible_dim():
  mesh = sharding.create_mesh(_cfg(2, 4, min_size=64))
  tree = {'big': jax.ShapeDtypeStruct((3, 3, 24, 8), jnp.float32),   # 24 and 8 divisible: 24
          'odd': jax.ShapeDtypeStruct((7, 9, 5), jnp.float32),        # none divisible
          'small': jax.ShapeDtypeStruct((16,), jnp.float32),          # < min_size
          'scalar': jax.ShapeDtypeStruct((), jnp.int32)}
  specs = jax.tree.map(lambda s: s.spec, sharding.param_shardings(tree, mesh, _cfg(2, 4)))
  assert specs == {'big': P(None, None, 'fsdp', None), 'odd': P(), 'small': P(), 'scalar': P()}
  no_fsdp = sharding.create_mesh(_cfg(-1, 1))
  assert sharding.param_shardings(tree, no_fsdp, _cfg(-1, 1))['big'].spec == P()
  assert sharding.batch_sharding(mesh).spec == P(('data', 'fsdp'))
