"""The CPU demo trained with prompts as queries, so that the prompt can choose which change to mark.

configs/demo.py's model, scenes and step budget, with config.data.targets = 'prompts': every
training pair is asked prompts_per_example of its per-prompt targets ("new buildings",
"demolished buildings", "new roads", "removed roads", "new mounds", "removed mounds",
"any change"; segchange_jax/data/synthetic.py), a share negative_rate of them prompts whose
kind did not change there, with an empty mask, so the model has to read the prompt. Evaluation
asks every target prompt of every pair and reports F1 / IoU per prompt ('f1/new buildings',
...) and their macro mean next to the pooled figures.

Measured with the upstream head (one run, 36 test pairs): it does not learn to select yet. Kind
prompts mark about as much where their kind did not change as where it did (predicted area on
negative prompts 0.89 of that on positives), 35 % of their marked pixels belong to another
kind's change, macro F1 0.18, and "any change" F1 0.514 against 0.571 for configs/demo.py.

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
  c.data.prompts_per_example = 2
  c.data.negative_rate = 0.25
  c.data.prompt = 'any change'   # what a record without targets would be asked
  # Comparison images draw one mask per pair; the per-prompt scores are in eval_test.json.
  c.eval.num_images = 0
  return c
