"""The CPU demo trained with prompts as queries, so that the prompt can choose which change to mark.

configs/demo.py's model and scenes, with config.data.targets = 'prompts': every
training pair is asked prompts_per_example of its per-prompt targets ("new buildings",
"demolished buildings", "new roads", "removed roads", "new mounds", "removed mounds",
"any change"; segchange_jax/data/synthetic.py), a share negative_rate of them prompts whose
kind did not change there, with an empty mask, so the model has to read the prompt. Evaluation
asks every target prompt of every pair and reports F1 / IoU per prompt ('f1/new buildings',
...) and their macro mean next to the pooled figures.

The model is configs/demo.py's with config.model.prompt_conditioning='film_head' (a
prompt-computed scale and shift after the mask head's GroupNorms, segchange_jax/models/
prompt_film.py; upstream's head cannot select, its prompt gain is normalised away), four
prompts per example and three times the demo's epochs (about 12 minutes on 2 cores). Measured
(bench/README.md, "Prompts that choose the change"; one run, 36 test pairs): it selects the
kind of change (building / road / mound prompts put 0.60-0.70 of their pixels on their kind,
macro F1 0.44 over the six kind prompts, "any change" F1 0.80 vs 0.58 for configs/demo.py) but
not the direction (new and demolished buildings give the same mask): 48 % of a kind prompt's
pixels are off target and negative prompts still mark 0.39 of the area of positive ones.

The scenes are the demo's (same seed, count and size, so bit-identical images), generated with
their target masks into their own folders: data/demo_shards may predate the targets.
"""

from configs import demo


def get_config():
  c = demo.get_config()
  c.name = 'demo_prompts'
  c.data.source_root = 'data/demo_prompts'
  c.data.shards_dir = 'data/demo_prompts_shards'
  c.data.targets = 'prompts'
  c.data.prompts_per_example = 4
  c.data.negative_rate = 0.25
  c.model.prompt_conditioning = 'film_head'
  c.train.epochs = 24
  c.data.prompt = 'any change'   # what a record without targets would be asked
  # Comparison images draw one mask per pair; the per-prompt scores are in eval_test.json.
  c.eval.num_images = 0
  return c
