"""The Flax model, one file per stage (docs/architecture.md, "Model stages and shapes").

`backbones/` (Swin, ResNet-50, HGNetv2; `backbones/__init__.py` is the registry and states the
backbone interface), `bev.py`, `diff.py`, `neck.py`, `head.py`, `segchange.py` (the whole model
and its torch mapping). Shared by them: `layers.py` (building blocks: norms, dense, convs),
`kernels.py` (written-out VJPs and CPU-lowering rewrites, each tested equal to its plain form),
`norms.py` (torch-semantics BatchNorm), `remat.py` and `torch_rules.py` (the rule engine mapping
torch state_dict keys onto Flax variables and back; each module with weights declares its
`torch_rules` next to it). `tta.py`: test-time augmentation (flips and rotations, logits
averaged), here so that evaluation and inference share it. What it imports:
docs/architecture.md "Import rules" (base modules only: no data, text, interop, training or
inference code).
"""
