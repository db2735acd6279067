"""Every config key of `bond`, documented once. Experiment files start from `get_config()` here.

Override any key from the command line: `--config.bond.beta=0.5 --config.train.num_steps=10`.
`bond/config.py` validates the result at start-up (unknown keys, ranges) before any compute.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict()
  c.model.preset = "toy"            # bond.models.presets name, or 'toy' (sized from the toy task)
  c.model.checkpoint = ""           # '' = random init; an HF directory or a .gguf file, or 'gemma3_270m'
  c.model.dtype = "float32"         # compute dtype: float32 | bfloat16
  c.model.param_dtype = "float32"   # parameter dtype: float32 | bfloat16
  c.model.remat = False
  c.model.init_seed = 0             # seed of the random init (ignored with a checkpoint)

  c.task = ml_collections.ConfigDict()   # the exact toy harness (bond.toy.make_task)
  c.task.num_prompts = 4
  c.task.num_content_tokens = 4
  c.task.completion_len = 3
  c.task.use_eos = True
  c.task.length_bonus = 0.0
  c.task.seed = 0
  c.task.reward_transform = "identity"   # identity | exp3 (r -> exp(3 r)), for invariance checks

  c.data = ml_collections.ConfigDict()
  c.data.source = "toy"             # toy | jsonl | tfds | pairs_jsonl (offline objectives)
  c.data.path = ""                  # jsonl / pairs_jsonl file
  c.data.tfds_name = ""             # e.g. 'xsum'
  c.data.tfds_split = "train"
  c.data.tfds_data_dir = ""
  c.data.prompt_key = "prompt"      # field holding the prompt text (jsonl/tfds)
  c.data.prompt_template = "{}"     # format applied to the prompt text
  c.data.max_prompt_len = 64        # longer prompts lose text tokens (counted), see below
  c.data.prompt_truncation = "keep_end"   # or "keep_start"; bos and the template stay whole
  c.data.batch_size = 8             # prompts per step, global over all hosts
  c.data.shuffle_seed = 0

  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.path = ""             # '' = from the checkpoint (GGUF vocab or HF dir), toy: none

  c.reward = ml_collections.ConfigDict()
  c.reward.kind = "toy"             # toy | vader | length | model
  c.reward.checkpoint = ""          # reward-model directory (kind=model)

  c.sampling = ml_collections.ConfigDict()
  c.sampling.max_new_tokens = 3
  c.sampling.temperature = 1.0      # samples used for training must come from the policy itself: 1.0
  c.sampling.top_k = 0
  c.sampling.top_p = 1.0

  c.bond = ml_collections.ConfigDict()
  c.bond.objective = "jbond"        # bond_fwd | bond_bwd | bond_jeffreys | jbond | reinforce | sft | dpo | ipo | bonbon
  c.bond.n = 4                      # N of the Best-of-N target (BOND; iterative BOND uses n=2)
  c.bond.k = 4                      # anchor samples per prompt for the quantile estimate p̂≤
  c.bond.num_policy_samples = 2     # policy samples per prompt (backward KL, REINFORCE; RLOO needs >= 2)
  c.bond.beta = 0.5                 # Jeffreys mix: (1-beta)*forward + beta*backward, in [0, 1]
  c.bond.gamma = 0.0                # J-BOND KL-to-anchor weight, >= 0
  c.bond.eta = 0.02                 # EMA anchor coefficient, in [0, 1]
  c.bond.anchor = "fixed"           # fixed (anchor = π_ref) | ema (J-BOND) | swap (iterative BOND)
  c.bond.swap_every = 100           # hard anchor swap period (anchor=swap)
  c.bond.jbond_penalty = 2.772588722239781   # log 16: J-BOND reward when y loses to both anchor samples
  c.bond.quantile_smoothing = "clip"         # clip (p̂≤ >= 1/(k+1)) | add_one ((1+#)/(k+1))
  c.bond.beta_rl = 0.01             # REINFORCE KL weight
  c.bond.alpha = 0.005              # BoNBoN SFT weight
  c.bond.beta_ipo = 0.0275482094    # DPO/IPO/BoNBoN beta (BoNBoN: beta*_n, here n = 8)

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 3e-6
  c.optim.warmup_steps = 100
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.weight_decay = 0.0
  c.optim.grad_clip = 1.0           # global-norm clip; 0 disables

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 100
  c.train.log_every = 10
  c.train.checkpoint_every = 50
  c.train.keep_checkpoints = 3
  c.train.seed = 0
  c.train.export_hf = False         # write the final policy as an HF directory in workdir/hf

  c.eval = ml_collections.ConfigDict()
  c.eval.every = 10                 # exact metrics (toy) / sample completions every this many steps
  c.eval.num_samples = 4            # completions printed / logged at eval

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                  # -1: all devices not used by fsdp * tensor
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  return c


def toy_schedule(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The shared optimisation schedule of the toy experiments (so they compare like for like):
  64 prompts per step, Adam lr 2e-3 with 10 warm-up steps, 180 steps, exact eval every 10."""
  c.data.batch_size = 64
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 10
  c.train.num_steps = 180
  c.train.log_every = 10
  c.train.checkpoint_every = 60
  c.eval.every = 10
  return c
