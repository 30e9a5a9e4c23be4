"""The CPU demo trained with prompts as queries, so that the prompt can choose which change to mark.

configs/demo.py's model and scenes, with config.data.targets = 'prompts': every
training pair is asked prompts_per_example of its per-prompt targets ("new buildings",
"demolished buildings", "new roads", "removed roads", "new mounds", "removed mounds",
"any change"; segchange_jax/data/synthetic.py), a share negative_rate of them prompts whose
kind did not change there, with an empty mask, so the model has to read the prompt. Evaluation
asks every target prompt of every pair and reports F1 / IoU per prompt ('f1/new buildings',
...) and their macro mean next to the pooled figures.

The model is configs/demo.py's with two opt-in additions that upstream's model does not have
(both start at identity, so an upstream checkpoint keeps its logits):
config.model.prompt_conditioning='film_head', a prompt-computed scale and shift after the mask
head's GroupNorms (segchange_jax/models/prompt_film.py; upstream's head cannot select, its
prompt gain is normalised away), and config.model.signed_difference='scales', a linear map of
B - A added to every scale's feature difference (segchange_jax/models/diff.py; upstream's
difference block loses which date holds the change). Four prompts per example, negatives drawn
as hard negatives (a prompt sharing a word with one the example carries), three times the
demo's epochs (about 12 minutes on 2 cores). Measured (bench/README.md, "Prompts that choose
the change"; one run, 36 test pairs): the prompt selects the direction (a prompt puts 0.01-0.06
of its pixels on the opposite direction of its kind) and mostly the kind, macro F1 0.57 over
the six kind prompts, "any change" F1 0.76 vs 0.58 for configs/demo.py; kinds of the same
direction still mix (removed roads and removed mounds mark some demolished buildings): 26 % of
a kind prompt's pixels are off target and negative prompts mark 0.22 of the area of positive
ones. Those are config.seed 42's figures; with --config.seed=1 the same config scores macro
F1 0.36, 50 % off target, negatives 0.69 of the positives' area (the seed spread is in
bench/README.md). --config.model.prompt_conditioning=dynamic_head selects about as well over
two seeds and answers several prompts for about the cost of one.

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
  c.data.hard_negative_share = 1.0
  c.model.prompt_conditioning = 'film_head'
  c.model.signed_difference = 'scales'
  c.train.epochs = 24
  c.data.prompt = 'any change'   # what a record without targets would be asked
  # Comparison images draw one mask per pair; the per-prompt scores are in eval_test.json.
  c.eval.num_images = 0
  return c
