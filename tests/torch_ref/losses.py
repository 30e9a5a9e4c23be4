"""Torch versions of the loss formulas (docs/architecture.md, "Losses"; written from the
formulas, not from upstream code).

Used by the loss parity tests and by bench/train_step.py as the reference training objective.
"""

import torch
import torch.nn.functional as F


def torch_binary(z, y, alpha=0.6, gamma=2.0, margin=2.0):
  """z [B,H,W] logits, y [B,H,W] 0/1 (torch tensors)."""
  y = y.float()
  ce = F.binary_cross_entropy_with_logits(z, y)
  p = torch.sigmoid(z)
  dice = 1 - (2 * (p * y).sum() + 1) / (p.sum() + y.sum() + 1)
  pt = p * y + (1 - p) * (1 - y)
  focal = (-alpha * (1 - pt) ** gamma * torch.log(pt + 1e-6)).mean()
  d = (z - y).abs()
  pos, neg = y == 1, y == 0
  lp = (d * pos).sum() / pos.sum() if pos.sum() > 0 else torch.zeros(())
  ln = ((torch.clamp(margin - d, min=0) * neg).sum() / neg.sum() if neg.sum() > 0
        else torch.zeros(()))
  return {'ce': ce, 'dice': dice, 'focal': focal, 'bcl': lp + ln}


def torch_multiclass(z, y, alpha=0.6, gamma=2.0, margin=2.0):
  """z [B,K,H,W] logits, y [B,H,W] int64 (torch layout)."""
  k = z.shape[1]
  ce = F.cross_entropy(z, y)
  prob = F.softmax(z, dim=1)
  onehot = F.one_hot(y, k).permute(0, 3, 1, 2).float()
  inter = (prob * onehot).sum(dim=(2, 3))
  union = prob.sum(dim=(2, 3)) + onehot.sum(dim=(2, 3))
  dice = 1 - ((2 * inter + 1) / (union + 1)).mean()
  logp = F.log_softmax(z, dim=1)
  logpt = logp.gather(1, y[:, None]).squeeze(1)
  focal = (-alpha * (1 - logpt.exp()) ** gamma * logpt).mean()
  terms = []
  for c in range(k):  # one-vs-rest binary BCL per class channel, classes present only
    yc = (y == c).float()
    if yc.sum() > 0:
      terms.append(torch_binary(z[:, c], yc, alpha, gamma, margin)['bcl'])
  bcl = torch.stack(terms).mean()
  return {'ce': ce, 'dice': dice, 'focal': focal, 'bcl': bcl}


def torch_total(parts: dict, loss_cfg) -> torch.Tensor:
  """Weighted sum of the four parts with config.loss weights."""
  c = loss_cfg
  return (c.weight_ce * parts['ce'] + c.weight_dice * parts['dice']
          + c.weight_focal * parts['focal'] + c.weight_bcl * parts['bcl'])
