"""The CPU demo trained with prompts as queries, so that the prompt can choose which change to mark.

configs/demo.py's model and scenes, with config.data.targets = 'prompts': every
training pair is asked prompts_per_example of its per-prompt targets ("new buildings",
"demolished buildings", "new roads", "removed roads", "new mounds", "removed mounds",
"any change"; segchange_jax/data/synthetic.py), a share negative_rate of them prompts whose
kind did not change there, with an empty mask, so the model has to read the prompt. Evaluation
asks every target prompt of every pair and reports F1 / IoU per prompt ('f1/new buildings',
...) and their macro mean next to the pooled figures.

The model is configs/demo.py's with two opt-in additions that upstream's model does not have:
config.model.prompt_conditioning='dynamic_head' (segchange_jax/models/prompt_readout.py; the
mask head's convs run once per pair and a small per-prompt network, its weights generated from
the prompt, reads their maps and the neck's: upstream's head cannot select, its prompt gain is
normalised away) and config.model.signed_difference='scales', a linear map of B - A added to
every scale's feature difference (segchange_jax/models/diff.py; upstream's difference block
loses which date holds the change). Every pair is asked all seven prompts at every step (K = 7,
about half of them negatives), three times the demo's epochs (about 10 minutes on 2 cores).

Measured (bench/README.md, "Prompts that choose the change"; 36 test pairs, config.seed 42 and
1): macro F1 0.695 / 0.657 over the six kind prompts, "any change" F1 0.78 (0.58 for
configs/demo.py); 12 % / 14 % of a kind prompt's marked pixels are on another kind's or
direction's change (the largest mix left: demolished buildings on removed mounds), and prompts
whose kind did not change mark 0.07 / 0.09 of the area of present ones (the targets are
<= 10 % and <= 0.02). Twice the epochs (--config.train.epochs=48, about 20 minutes; seeds 42,
1, 2): macro F1 0.76 (0.75-0.78), off-target 4.2-5.3 %, negatives 0.019-0.037 (mean
0.028). film_head, this config's head before, scored 0.57 / 0.36, 26 % / 50 %, 0.22 / 0.69 at
504 steps (--config.model.prompt_conditioning=film_head --config.data.prompts_per_example=4
--config.data.negative_rate=0.25).

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
  # The scenes have seven target prompts: K = 7 asks each pair all of them, the ones it does not
  # carry as negatives (sample_prompts fills the slots a pair's targets cannot fill with
  # negatives), which dynamic_head answers for about the cost of one. With every prompt asked,
  # hard_negative_share only orders the slots.
  c.data.prompts_per_example = 7
  c.data.negative_rate = 0.0
  c.data.hard_negative_share = 1.0
  c.model.prompt_conditioning = 'dynamic_head'
  c.model.signed_difference = 'scales'
  c.train.epochs = 24
  c.data.prompt = 'any change'   # what a record without targets would be asked
  # Comparison images draw one mask per pair; the per-prompt scores are in eval_test.json.
  c.eval.num_images = 0
  return c
