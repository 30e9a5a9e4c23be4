"""Interop: weights from and to the PyTorch world and the Hugging Face Hub.

`torch_pickle` (reads .pth files without torch and without running pickled code),
`checkpoints` (reading and writing every kind of SegChange checkpoint: ours, variables folders,
upstream .pth; finding the step folder; merging loaded arrays onto a target), `upstream` (whole
upstream SegChange checkpoints, both directions: `python -m segchange_jax.convert_torch`),
`pretrained` (`config.model.pretrained`: timm / torchvision / D-FINE backbone files), `hub` (Hub
ids into the HF cache, checksum-verified). The rule engine mapping torch state_dict keys onto
Flax variables lives with the model (`models/torch_rules.py`). What it imports:
docs/architecture.md "Import rules" (base modules and models/).
"""
