"""Text encoders and prompt embeddings.

Flax BERT / Phi / Llama (`bert.py`, `phi.py`, `llama.py`, shared `layers.py`) loaded from
Hugging Face safetensors or GGUF (`loading.py`, `gguf_io.py`) behind `encoder.TextEncoder`;
`cache.py` computes each distinct prompt once and keeps it on disk; `prompts.py` is the one
place a prompt becomes the model's [P, T, L] input (from an .npz, the cache or the encoder).
What this layer may import: docs/architecture.md, "Import rules".
"""
