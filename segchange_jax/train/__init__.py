"""Training: the jitted step, the loop around it, and what the loop needs.

`train_step` (TrainState, sharded init, the one jitted train / eval step), `loop` (data,
prompt table, steps, evaluation, checkpoints, logs: `train_and_evaluate`), `losses`,
`metrics`, `optim` (AdamW with two learning rates, schedules, freezing), `param_groups`,
`sharding` (the data x fsdp mesh), `checkpointing` (Orbax managers, exact resume; reading any
checkpoint is interop/checkpoints.py), `summary` (metrics.csv + TensorBoard), `distributed`
(multi-process start-up), `init_from`, `evaluation` (scoring a checkpoint on a split).
`python -m segchange_jax.train` runs `__main__.py`. What this layer may import:
docs/architecture.md, "Import rules".
This file imports nothing, so `python -m segchange_jax.train` starts fast.
"""
