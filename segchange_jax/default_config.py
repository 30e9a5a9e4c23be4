"""Every config field with its default: the schema of a SegChange config.

The upstream SegChange-R1 configs/config.yaml, grouped. It lives in the library (not in the
repository's `configs/`) because loading a checkpoint rebuilds its config from these fields.
Experiment files (`configs/base.py` re-exports this `get_config`; `configs/dvcd.py`,
`configs/levir.py`, ... call it and edit a few fields) stay in the repository. The returned
ConfigDict is locked: assigning a field that does not exist (a typo in a variant or on the
command line) raises at once.
Values are checked by `segchange_jax.config_lib.validate_config`.

Upstream field -> ours (for users coming from configs/config.yaml):
  seed -> seed;  data.data_root -> data.source_root;  data.data_format -> data.layout;
  data.transforms.* -> data.augment.*;  model.backbone_name -> model.backbone;
  model.bev_name -> model.bev;  model.text_encoder_name -> text.model;
  model.desc_embs -> text.embeddings;  training.* -> train.*;  test.* -> eval.*;
  infer.* -> infer.*;  output_dir -> --workdir;  resume -> automatic from --workdir.
"""

from __future__ import annotations

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the upstream default recipe (Swin-B, LinearAttention, L-FPN, CBAM, EGA)."""
  c = ml_collections.ConfigDict()
  c.name = 'train'  # names the run in the training log
  c.seed = 42
  # Path to weights to start from: an upstream .pth or one of our checkpoint dirs.
  c.init_from = ''

  # ---------------------------------------------------------------- data
  c.data = ml_collections.ConfigDict()
  c.data.shards_dir = ''         # output of `python -m data_prep.convert`
  c.data.source_root = ''        # raw layout; converted into shards_dir if given
  c.data.layout = 'segchange-custom'  # see data_prep.convert --help for the layouts
  c.data.train_split = 'train'
  c.data.val_split = 'val'
  c.data.test_split = 'test'
  c.data.train_list = ''          # optional file of names selecting a subset of train (few-shot)
  c.data.image_size = 512         # training crop/tile size (H = W)
  c.data.prompt = 'Buildings with changes, Mound changes.'  # used where no prompt is given
  c.data.num_workers = 2         # reading/augmenting runs on 2 * max(1, num_workers) threads
  c.data.worker_processes = 0    # > 0: those threads run in each of that many grain processes
  c.data.prefetch_buffer = 2
  c.data.shuffle = True
  # What a training example asks the model: 'label' (one prompt per record, its label, as
  # upstream) or 'prompts' (the records' per-prompt targets: each example draws
  # prompts_per_example (prompt, mask) slots, a share negative_rate of them prompts of the
  # dataset's target_prompts that the example does not carry, with an empty mask; evaluation
  # asks every target prompt of every example and reports per-prompt F1 / IoU).
  c.data.targets = 'label'
  c.data.prompts_per_example = 2
  c.data.negative_rate = 0.25
  # Share of the negatives that share a word with a prompt the example carries ("demolished
  # buildings" for "new buildings"): rejecting those needs the whole prompt read.
  c.data.hard_negative_share = 0.0
  # Synthetic scenes (data_prep.synthetic) generated into source_root when n > 0 and missing.
  c.data.synthetic = ml_collections.ConfigDict()
  c.data.synthetic.n = 0
  c.data.synthetic.size = 256
  c.data.synthetic.seed = 0
  c.data.augment = ml_collections.ConfigDict()
  c.data.augment.enabled = True
  c.data.augment.apply_prob = 0.5
  c.data.augment.color_jitter = 0.2
  c.data.augment.rotation_degree = 15.0
  c.data.augment.gamma_range = (0.8, 1.2)
  c.data.augment.affine_degree = 0.0
  c.data.augment.erase_prob = 0.0
  c.data.augment.erase_ratio = (0.0, 0.0)
  c.data.augment.blur_sigma = 0.3
  c.data.augment.clahe = 0.5       # probability of CLAHE on the L channel
  c.data.augment.hflip = False     # upstream: no flips
  c.data.augment.vflip = False

  # ---------------------------------------------------------------- model
  c.model = ml_collections.ConfigDict()
  c.model.num_classes = 1
  c.model.backbone = 'swin_base_patch4_window7_224'
  c.model.bev = 'LinearAttention'
  c.model.fpn_type = 'L-FPN'
  c.model.use_ega = True
  c.model.diff_attention = 'CBAM'
  c.model.out_dims = (256, 256, 256, 256)
  c.model.fpn_dim = 256
  c.model.gn_groups = 32          # GroupNorm groups in neck and head (upstream 32)
  c.model.use_token_connector = False
  c.model.token_dim = 128
  # Backbone start: '' random, 'imagenet' (upstream's weights, fetched from the Hugging Face
  # Hub), a Hub id or a local timm / torchvision / PPHGNetV2 file
  # (segchange_jax/interop/pretrained.py).
  # The upstream variants (dvcd, levir, whu, sysu_fewshot) set 'imagenet'.
  c.model.pretrained = ''
  c.model.img_size = 512
  c.model.num_queries = 5
  c.model.head_heads = 8
  c.model.decoder_layers = 2
  c.model.decoder_ffn = 2048
  c.model.dropout = 0.1
  c.model.bev_heads = 8
  c.model.bev_dim_head = 8
  c.model.bev_transformer_layers = 2
  c.model.bev_transformer_ffn = 2048
  c.model.dtype = 'float32'       # compute dtype; params stay float32
  # How the prompt steers the mask (segchange_jax/models/prompt_film.py): 'none' is upstream's
  # model (exact upstream logits); 'film_head' / 'film_neck' add a prompt-computed scale and
  # shift after the head's (and the neck's) GroupNorms, so that a prompt can choose which change;
  # 'dynamic_head' runs the head's convs once per pair and reads their maps and the neck's with a
  # small per-prompt network whose weights the prompt generates, so that several prompts cost
  # little more than one.
  c.model.prompt_conditioning = 'none'
  # Linear maps of B - A (zero at the start), so that the time direction ("new" vs
  # "demolished") reaches the head (models/diff.py): 'none' (upstream), 'map' (the finest
  # scale's, added to the neck's output map) or 'scales' (each scale's, added to its difference).
  c.model.signed_difference = 'none'
  # Activation memory vs recompute (segchange_jax/models/remat.py): 'none' keeps every
  # activation; 'dots' keeps only matmul outputs inside each block; 'block' keeps only block
  # inputs (least memory, one extra forward of each block in the backward pass), the choice
  # when memory rather than step time limits the batch or image size.
  c.model.remat = 'none'
  # Backbone shapes; upstream values by default, shrunk in configs/demo.py.
  c.model.swin = ml_collections.ConfigDict()
  c.model.swin.embed_dim = 128
  c.model.swin.depths = (2, 2, 18, 2)
  c.model.swin.num_heads = (4, 8, 16, 32)
  c.model.swin.window_size = 7
  c.model.swin.mlp_ratio = 4.0
  c.model.swin.drop_path_rate = 0.1  # stochastic depth (timm default, upstream trains with it)
  c.model.resnet = ml_collections.ConfigDict()
  c.model.resnet.depths = (3, 4, 6, 3)
  c.model.resnet.width = 64
  c.model.hgnetv2 = ml_collections.ConfigDict()
  c.model.hgnetv2.variant = 'B5'

  # ---------------------------------------------------------------- text
  c.text = ml_collections.ConfigDict()
  c.text.model = 'bert-base-uncased'   # Hub id, local HF folder, .gguf file or pkg:<package>
  c.text.dim = 768                     # 768 BERT-base, 2048 Phi-1.5, 384 MiniLM, 576 SmolLM2
  c.text.max_tokens = 8
  c.text.embeddings = ''               # precomputed .npz from segchange_jax.embed_prompts
  # On-disk prompt-embedding cache ('' = ~/.cache/segchange_jax).
  c.text.cache_dir = ''
  c.text.dtype = 'float32'
  c.text.freeze = True                 # upstream freeze_text_encoder; must stay True (validated)

  # ---------------------------------------------------------------- loss
  c.loss = ml_collections.ConfigDict()
  c.loss.weight_ce = 1.0
  c.loss.weight_dice = 1.5
  c.loss.weight_focal = 1.5
  c.loss.alpha = 0.6
  c.loss.gamma = 2.0
  c.loss.weight_bcl = 0.3
  c.loss.bcl_margin = 2.0

  # ---------------------------------------------------------------- train
  c.train = ml_collections.ConfigDict()
  c.train.epochs = 200
  c.train.max_steps = 0            # > 0 stops after this many steps (overrides epochs)
  c.train.batch_size = 4           # global batch over all devices and hosts
  c.train.lr = 1e-4
  c.train.lr_backbone = 1e-5
  c.train.weight_decay = 1e-4
  c.train.b1 = 0.9
  c.train.b2 = 0.999
  c.train.eps = 1e-8
  c.train.scheduler = 'step'       # step | plateau | cosine
  c.train.lr_drop = 20             # step: epochs between drops
  c.train.lr_gamma = 0.1
  c.train.warmup_steps = 0         # cosine: linear warmup
  c.train.plateau_patience = 10    # plateau: epochs without val-loss improvement
  c.train.plateau_factor = 0.1
  c.train.grad_clip_norm = 0.0     # 0 = off
  c.train.grad_accum_steps = 1
  # How gradients are summed over devices: 'per_param' (jit's automatic partitioning: one
  # all-reduce per parameter, combined by XLA into one instruction) or 'flat' (per-device
  # forward/backward, one all-reduce of all gradients as one vector: for CPU clusters, whose
  # gloo collectives move each array of an instruction in its own round trip; data-parallel
  # meshes only, mesh.fsdp = 1).
  c.train.grad_reduction = 'per_param'
  c.train.eval_every_epochs = 1
  c.train.start_eval = 1           # first epoch to evaluate
  c.train.threshold = 0.5
  c.train.log_every_steps = 10
  c.train.progress_bar = True
  # Multi-process runs agree on stopping (SIGTERM on one host) at log points, evaluations,
  # epoch ends, saves and at least every this many steps; never after every step.
  c.train.stop_check_every = 10
  c.train.profile_steps = (0, 0)   # (start, stop): jax.profiler trace of steps start+1..stop
  # Persistent XLA compilation cache: a restarted or resumed run skips the compile ('' = off).
  c.train.compilation_cache_dir = '~/.cache/segchange_jax/xla'

  # ---------------------------------------------------------------- eval
  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 4
  c.eval.threshold = 0.5
  c.eval.split = 'test'
  c.eval.num_images = 8            # worst/best N comparison images (0 = none)

  # ---------------------------------------------------------------- infer
  c.infer = ml_collections.ConfigDict()
  c.infer.window = 512
  c.infer.overlap = 64
  c.infer.batch_size = 8
  c.infer.threshold = 0.5
  c.infer.postprocess = False
  c.infer.min_area = 2500
  c.infer.max_perimeter_ratio = 10.0
  c.infer.min_convexity = 0.8

  # ---------------------------------------------------------------- mesh
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                 # -1 = all devices not used by other axes
  c.mesh.fsdp = 1
  c.mesh.fsdp_min_size = 2**18     # params with fewer elements stay replicated

  # ---------------------------------------------------------------- checkpoint
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.keep = 2            # latest N
  c.checkpoint.keep_best = True    # plus best-F1 and best-IoU
  c.checkpoint.every_steps = 0     # 0 = at the end of every epoch
  c.checkpoint.async_save = True

  # ---------------------------------------------------------------- distributed
  c.distributed = ml_collections.ConfigDict()
  c.distributed.coordinator_address = ''
  c.distributed.num_processes = 0
  c.distributed.process_id = -1
  # Seconds to wait for every process to join (and to finish compiling a step), and without a
  # heartbeat before a process is declared dead (the others then fail instead of hanging).
  c.distributed.initialization_timeout = 300
  c.distributed.heartbeat_timeout = 100

  c.lock()
  return c
