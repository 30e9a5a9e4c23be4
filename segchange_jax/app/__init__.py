"""Browser app: pick a sample pair or upload two dates, type prompts, see and download the change.

    pip install -e '.[app]'
    python -m segchange_jax.app --checkpoint runs/demo/checkpoints [--port 7860] [--host 127.0.0.1]

`ui.py` holds the page (gradio Blocks) and its steps as plain functions (`detect`: the windowed
engine of `infer` over the pair; `render`: threshold, overlay, area, downloads); `samples.py`
the bundled synthetic pairs; `__main__.py` the command. Everything runs offline. What it may
import: docs/architecture.md, "Import rules".
"""
