"""The Flax model, one file per stage (docs/architecture.md, "Model stages and shapes").

`backbones/` (Swin, ResNet-50, HGNetv2; `backbones/__init__.py` is the registry), `bev.py`,
`diff.py`, `neck.py`, `head.py`, `segchange.py` (the whole model and its torch mapping), shared
`layers.py` / `backbones/norms.py` (torch-semantics BatchNorm) and `remat.py`. Each module with
weights declares its `torch_rules` next to it. May import: base modules and
`interop/torch_rules.py` only (no data, training or inference code).
"""
