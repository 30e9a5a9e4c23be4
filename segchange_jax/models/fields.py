"""Reading opt-in `config.model` fields that configs saved before the field existed lack."""

from __future__ import annotations

from typing import Any, Sequence


def model_field(model_cfg: Any, name: str, default: Any,
                choices: Sequence[Any] | None = None) -> Any:
  """`model_cfg[name]`, `default` when absent (or `model_cfg` is not a mapping).

  With `choices`, a value outside them raises ValueError naming the field: a saved config that
  never went through config_lib's validation fails here instead of acting as the default.
  """
  value = model_cfg.get(name, default) if hasattr(model_cfg, 'get') else default
  if choices is not None and value not in choices:
    raise ValueError(f'config.model.{name}={value!r} is not one of {list(choices)}')
  return value
