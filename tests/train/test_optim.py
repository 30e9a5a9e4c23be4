"""AdamW with two lrs / frozen params / clipping vs torch.optim.AdamW; schedules vs torch."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from segchange_jax.train import optim
from tests.train.traincore_toy import toy_config

SHAPES = {'backbone': {'stage': {'w': (3, 4)}}, 'neck': {'w': (4, 2), 'b': (2,)},
          'stem': {'w': (5,)}}


def _run_both(config, steps, steps_per_epoch, frozen=False, grad_scale=1.0):
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(size=s).astype(np.float32), SHAPES,
                        is_leaf=lambda x: isinstance(x, tuple))
  grads_seq = [jax.tree.map(lambda p: (grad_scale * rng.normal(size=p.shape)).astype(np.float32),
                            params) for _ in range(steps)]
  frozen_mask = ({'backbone': {'stage': {'w': False}}, 'neck': {'w': False, 'b': False},
                  'stem': {'w': True}} if frozen else None)

  tx = optim.make_optimizer(config, params, steps_per_epoch, frozen_mask)
  jp = jax.tree.map(jnp.asarray, params)
  opt_state = tx.init(jp)
  update = jax.jit(tx.update)
  for g in grads_seq:
    upd, opt_state = update(jax.tree.map(jnp.asarray, g), opt_state, jp)
    jp = optax.apply_updates(jp, upd)

  t = config.train
  tp = jax.tree.map(lambda p: torch.tensor(p, requires_grad=True), params)
  head = [tp['neck']['w'], tp['neck']['b']] + ([] if frozen else [tp['stem']['w']])
  trainable = head + [tp['backbone']['stage']['w']]
  opt = torch.optim.AdamW([{'params': head, 'lr': t.lr},
                           {'params': [tp['backbone']['stage']['w']], 'lr': t.lr_backbone}],
                          lr=t.lr, betas=(t.b1, t.b2), eps=t.eps, weight_decay=t.weight_decay)
  sched = torch.optim.lr_scheduler.StepLR(opt, step_size=t.lr_drop, gamma=t.lr_gamma)
  for i, g in enumerate(grads_seq):
    opt.zero_grad()
    for p, gv in zip(jax.tree.leaves(tp), jax.tree.leaves(g)):
      p.grad = torch.tensor(gv)
    if t.grad_clip_norm > 0:
      torch.nn.utils.clip_grad_norm_(trainable, t.grad_clip_norm)
    opt.step()
    if (i + 1) % steps_per_epoch == 0:
      sched.step()  # StepLR is stepped once per epoch upstream
  ref = jax.tree.map(lambda p: p.detach().numpy(), tp)
  return params, jax.tree.map(np.asarray, jp), ref


@pytest.mark.parametrize('frozen,clip', [(False, 0.0), (True, 0.0), (False, 0.5)])
def test_adamw_two_lrs_steplr_matches_torch(frozen, clip):
  # Large lrs and weight decay so that every term (decay, bias correction, lr drop) is visible.
  config = toy_config(lr=1e-2, lr_backbone=3e-3, weight_decay=0.1, lr_drop=1, lr_gamma=0.5,
                      scheduler='step', grad_clip_norm=clip)
  init, ours, ref = _run_both(config, steps=6, steps_per_epoch=2, frozen=frozen, grad_scale=2.0)
  err = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(ours),
                                                         jax.tree.leaves(ref)))
  moved = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(ours),
                                                           jax.tree.leaves(init)))
  assert moved > 1e-2 and err < 2e-6, (err, moved)
  if frozen:
    np.testing.assert_array_equal(ours['stem']['w'], init['stem']['w'])


def test_default_label_fn_follows_backbone_in_name():
  labels = optim.param_labels({'params': {'backbone': {'x': 1}, 'backbone_proj': {'y': 2},
                                                     'head': {'z': 3}}})
  assert labels == {'params': {'backbone': {'x': 'backbone'}, 'backbone_proj': {'y': 'backbone'},
                               'head': {'z': 'head'}}}
  custom = optim.param_labels({'a': 1, 'b': 2},
                              label_fn=lambda n: 'backbone' if n[-1] == 'a' else 'head',
                              frozen_mask={'a': True, 'b': False})
  assert custom == {'a': 'frozen', 'b': 'head'}


def test_step_schedule_matches_torch_steplr():
  config = toy_config(lr=1e-4, lr_drop=3, lr_gamma=0.1, scheduler='step')
  spe = 5
  sched = optim.make_schedule(config, 1e-4, spe)
  p = torch.nn.Parameter(torch.zeros(1))
  opt = torch.optim.SGD([p], lr=1e-4)
  torch_sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.1)
  for epoch in range(10):
    for s in range(spe):
      assert float(sched(epoch * spe + s)) == pytest.approx(opt.param_groups[0]['lr'], rel=1e-6)
    opt.step()
    torch_sched.step()


def test_cosine_schedule_with_warmup():
  config = toy_config(lr=1e-3, scheduler='cosine', warmup_steps=10, max_steps=110)
  sched = optim.make_schedule(config, 1e-3, 7)
  for step in (0, 5, 10, 35, 60, 109, 110):
    if step < 10:
      want = 1e-3 * step / 10
    else:
      want = 1e-3 * 0.5 * (1 + math.cos(math.pi * (step - 10) / 100))
    assert float(sched(step)) == pytest.approx(want, abs=1e-9), step


def test_plateau_matches_torch_reduce_on_plateau():
  losses = [1.0, 0.9, 0.95, 0.92, 0.91, 0.9, 0.89, 0.95, 0.96, 0.97, 0.98, 0.5, 0.6, 0.7, 0.8]
  p = torch.nn.Parameter(torch.zeros(1))
  opt = torch.optim.SGD([p], lr=1.0)
  torch_sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode='min', factor=0.1, patience=2)
  state = optim.init_plateau()
  update = jax.jit(lambda s, v: optim.plateau_update(s, v, patience=2, factor=0.1))
  for v in losses:
    opt.step()
    torch_sched.step(v)
    state = update(state, v)
    assert float(state['scale']) == pytest.approx(opt.param_groups[0]['lr'], rel=1e-6), v
  assert float(state['scale']) < 0.05  # it did reduce
