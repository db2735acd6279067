"""One J-BOND training step (BOND Algorithm 2) of `bond` against the same step in plain PyTorch/HF.

Same weights, same prompts, same programmatic reward on both sides. Per prompt: 2 completions of
the anchor and 1 of the policy (temperature 1, no top-k/top-p, no eos: every row has exactly
`--new-tokens` tokens), a bag-of-tokens reward, teacher-forced log-probs (policy on the best anchor
sample and on the policy sample, with gradients; anchor on the policy sample, without), the J-BOND
loss (β = 0.5, γ = 0, penalty log 16, batch leave-one-out baseline), Adam (lr 3e-6, global-norm
clip 1.0, no warm-up) and the EMA anchor θa ← (1−η)θa + ηθ (η = 0.02). f32 params, bf16 compute.

`bond`: `rollout.make_rollout_fn` + `steps.make_update_fn`, jitted as `bond/train.py` jits them
(the update donated); its phases are separately jitted sub-functions built from the same pieces.
With `bond.anchor_logp='decode'` (the default; `--anchor-logp=pass` for the teacher-forced pass)
the anchor's sampling loop also scores the policy sample, so bond's no-grad phase is empty and its
sampling phase includes that scoring.
PyTorch: `transformers` model exported with `convert.to_hf` (a second copy is the anchor),
`generate` for the samples, autograd under `torch.autocast("cpu", bfloat16)`, `torch.optim.Adam`,
EMA on the anchor's parameters. It runs in a child process (clean peak RSS, no JAX threads),
and its timed steps alternate with bond's whole steps (bond, torch, bond, torch, ...) so that a
busy spell of a shared host slows both sides rather than one; the ratio is printed best / best
and as the median of the per-pair ratios.

Printed: per-phase best times, the sum of the parts against the whole step (timed apart), the
fwd+bwd's model-FLOPs utilisation (6 · params · tokens of the two grad passes, against the bf16
matmul peak measured in this run), bond/PyTorch per whole step, compile (first call − steady
state) and peak RSS; then the roofline floor of bond's step (`step_floor`: its work at this run's
highest bf16 matmul rate and its measured memory bandwidth) against the time 3x the PyTorch step
allows, so the printout says whether issue 16's 3x is within this host's reach at all.

  python benchmarks/train_step.py                   # gemma3_35m, 16 prompts x 16 + 32 tokens
  python benchmarks/train_step.py --gguf            # real Gemma 3 270M, 4 prompts x 12 + 32 tokens
  python benchmarks/train_step.py --smoke           # tiny_gemma3, < 60 s, for development
  python benchmarks/train_step.py --gguf --malloc-hugepages=off   # glibc's defaults, both sides
  python benchmarks/train_step.py --torch-glibc-defaults  # bond's malloc setting, torch glibc's
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

BETA, GAMMA, ETA, LR, CLIP = 0.5, 0.0, 0.02, 3e-6, 1.0
PENALTY = math.log(16.0)
NUM_ANCHOR = 2


def rss_now_gb() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def rss_peak_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB on Linux


def jbond_config(preset: str, new_tokens: int, anchor_logp: str = "decode"):
  """bond's config of the benchmarked J-BOND step (the constants above; f32 params, bf16 compute)."""
  from bond import defaults
  config = defaults.get_config()
  config.bond.objective, config.bond.anchor = "jbond", "ema"
  config.bond.update(beta=BETA, gamma=GAMMA, eta=ETA, jbond_penalty=PENALTY,
                     anchor_logp=anchor_logp)
  config.model.preset = preset
  config.model.dtype, config.model.param_dtype = "bfloat16", "float32"
  config.sampling.max_new_tokens = new_tokens
  config.optim.update(lr=LR, warmup_steps=0, grad_clip=CLIP)
  return config


def step_floor(config, params, b: int, p: int, t: int, peak: float, bandwidth: float,
               anchor_logp: str = "decode") -> dict:
  """Roofline floor (s) of bond's J-BOND step's work on this host: each phase's FLOPs at the
  matmul `peak` or its bytes at the memory `bandwidth`, whichever is slower, and nothing else.

  The work counted is what bond's step does (a floor for its design, not for any J-BOND step):
  sampling: each model's prompt pass (`sampler.roofline_prefill`), then per new token one decode
  step per model, whose rows are the policy's b samples and the anchor's 2b (+ b forced rows
  scoring the policy's samples with anchor_logp='decode'), each max(weights + KV bytes /
  bandwidth, FLOPs / peak) (`sampler.roofline_step`); fwd+bwd: each prompt once with its 2 graded
  completions behind it, the vocabulary projection at the 2t completion positions only, 3x the
  forward's matmul FLOPs; no-grad pass (anchor_logp='pass'): the anchor on the policy samples;
  optimizer + anchor: the clipping's norm reads g, Adam reads g, mu, nu, theta and writes three
  of them, the EMA reads and writes theta_anchor, all f32.
  """
  import jax

  import sampler   # benchmarks/sampler.py
  n_params = sum(x.size for x in jax.tree.leaves(params))
  n_embed = sampler.embedding_size(params)
  body = n_params - n_embed
  anchor_rows = NUM_ANCHOR * b + (b if anchor_logp == "decode" else 0)
  decode = sum(sampler.roofline_step(config, params, rows, p + i + 1, bandwidth, peak)
               for rows in (b, anchor_rows) for i in range(t))
  prefill = 2 * sampler.roofline_prefill(params, b, p, peak)     # policy and anchor
  fwd_bwd = 3 * (2 * body * b * (p + 2 * t) + 2 * n_embed * b * 2 * t) / peak
  no_grad = (2 * body * b * (p + t) + 2 * n_embed * b * t) / peak if anchor_logp == "pass" else 0.
  update = 10 * 4 * n_params / bandwidth
  return {"sampling": prefill + decode, "no-grad passes": no_grad, "fwd+bwd": fwd_bwd,
          "optimizer + anchor": update}


def jbond_setup(gguf: bool):
  """(preset, model config, f32 params, prompt batch, reward fn) of this script's default run:
  gemma3_35m with 16 prompts x 16 tokens, or (gguf) the real Gemma 3 270M with 4 x 12; bf16
  compute, no eos. For the scripts that time one part of that step (anchor_logp.py,
  kept_logits.py)."""
  import jax
  import jax.numpy as jnp

  import sampler   # benchmarks/sampler.py
  from bond import rewards
  from bond.models import gemma, presets
  if gguf:
    from bond import assets
    from bond.models import convert
    mc, params = convert.from_gguf(assets.gemma3_270m_gguf_path())
    mc = mc.replace(dtype=jnp.bfloat16, param_dtype=jnp.float32)
    b, p, preset = 4, 12, "gemma3_270m"
  else:
    mc = presets.get("gemma3_35m", dtype=jnp.bfloat16, param_dtype=jnp.float32)
    params = gemma.init_params(mc.replace(dtype=jnp.float32), jax.random.key(0))
    b, p, preset = 16, 16, "gemma3_35m"
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  mc = mc.replace(eos_id=-1)
  tokens, _ = sampler.prompts(mc, b, p)
  batch = {"prompt_tokens": jnp.asarray(tokens), "prompt_mask": jnp.ones(tokens.shape, bool)}
  return preset, mc, params, batch, rewards.bag_of_tokens_reward(reward_weights(mc.vocab_size))


def alternated(calls: dict, repeats: int) -> dict:
  """{name: [seconds]}: each of calls' no-argument functions (which block) timed `repeats` times,
  alternated call by call so that a busy spell of a shared host slows every side."""
  res = {k: [] for k in calls}
  for _ in range(repeats):
    for k, call in calls.items():
      start = time.perf_counter()
      call()
      res[k].append(time.perf_counter() - start)
  return res


def print_alternated(res: dict, label: str, slow: str, fast: str) -> None:
  """Best and median ms of each side of `alternated`, and slow / fast of both."""
  for k, v in res.items():
    print(f"{label}{k}: best {min(v) * 1e3:.1f} ms, median {np.median(v) * 1e3:.1f} ms; "
          f"calls {[round(x * 1e3) for x in v]}")
  best, median = ({k: f(v) for k, v in res.items()} for f in (min, np.median))
  print(f"{slow} / {fast}: {best[slow] / best[fast]:.2f}x best / best, "
        f"{median[slow] / median[fast]:.2f}x median / median")


def reward_weights(vocab: int) -> np.ndarray:
  """The bag-of-tokens reward's hidden per-token weights, identical on both sides."""
  return np.random.default_rng(1).normal(size=vocab).astype(np.float32)


# ------------------------------------------------------------------------------------ PyTorch

def torch_side(workdir: str, commands) -> dict:
  """The plain PyTorch/HF step on the weights in `workdir/hf`: loads, runs one untimed step,
  replies ready, then runs one timed step per "step" line of `commands` (replying its phase
  times); returns the check log-probs, first-step time and RSS."""
  import copy

  import torch
  import transformers
  torch.set_num_threads(2)
  torch.manual_seed(0)
  data = np.load(os.path.join(workdir, "data.npz"))
  ids = torch.tensor(data["prompts"], dtype=torch.long)
  attn = torch.ones_like(ids)
  weights = torch.tensor(data["weights"])
  new_tokens = int(data["new_tokens"])
  b, p = ids.shape

  policy = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.join(workdir, "hf"), dtype=torch.float32).eval()
  policy.generation_config.eos_token_id = None          # no eos: exactly new_tokens per row
  # The anchor's params keep requires_grad (it is only ever run under no_grad and is not in the
  # optimizer): autocast caches its bf16 weight casts only for leaves that require grad.
  anchor = copy.deepcopy(policy)
  optimizer = torch.optim.Adam(policy.parameters(), lr=LR, betas=(0.9, 0.999))
  autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731

  def generate(model, n):
    out = model.generate(ids, attention_mask=attn, do_sample=True, temperature=1.0, top_k=0,
                         top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         num_return_sequences=n, pad_token_id=0)
    return out[:, p:].reshape(b, n, new_tokens)

  def seq_logp(model, prompts, completions):
    seq = torch.cat([prompts, completions], dim=1)
    logits = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits
    logp = torch.log_softmax(logits[:, p - 1:-1].float(), dim=-1)
    return logp.gather(-1, completions[..., None])[..., 0].sum(-1)

  def step():
    t = [time.perf_counter()]
    with torch.no_grad(), autocast():                    # sampling
      y_anchor = generate(anchor, NUM_ANCHOR)            # [B, 2, T]
      y = generate(policy, 1)[:, 0]                      # [B, T]
    t.append(time.perf_counter())
    r_anchor = weights[y_anchor].sum(-1)                 # rewards, [B, 2]
    r_y = weights[y].sum(-1)
    best = y_anchor[torch.arange(b), r_anchor.argmax(1)]  # first maximiser, as bond
    beats = r_y >= r_anchor.min(1).values
    t.append(time.perf_counter())
    with torch.no_grad(), autocast():                    # no-grad pass: anchor on y
      anchor_lp = seq_logp(anchor, ids, y)
    t.append(time.perf_counter())
    with autocast():                                     # fwd+bwd: policy on [best; y]
      lp = seq_logp(policy, torch.cat([ids, ids]), torch.cat([best, y]))
    lp_best, lp_y = lp[:b], lp[b:]
    fwd = -lp_best.mean()
    reward = torch.where(beats, 0.0, -PENALTY) - (lp_y - anchor_lp).detach()
    baseline = (reward.sum() - reward) / (b - 1)         # leave-one-out over the batch
    bwd = torch.mean(-reward - (reward - baseline) * (lp_y - lp_y.detach()))
    loss = (1 - BETA) * fwd + BETA * bwd                 # γ = 0: no KL term
    loss.backward()
    t.append(time.perf_counter())
    torch.nn.utils.clip_grad_norm_(policy.parameters(), CLIP)   # optimizer + anchor
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
      for a, q in zip(anchor.parameters(), policy.parameters()):
        a.mul_(1 - ETA).add_(q, alpha=ETA)
    t.append(time.perf_counter())
    return np.diff(t), t[-1] - t[0]

  # Same weights: teacher-forced log-probs of fixed completions, compared with bond's by the parent.
  with torch.no_grad(), autocast():
    check = seq_logp(policy, ids, torch.tensor(data["check"], dtype=torch.long)).numpy()
  rss_loaded = rss_now_gb()
  first = step()[1]
  reply({"ready": True})
  # Then one timed step per request: the parent alternates them with its own steps.
  runs = []
  for line in commands:
    if line.strip() != "step":
      break
    parts, whole = step()
    runs.append((parts, whole))
    reply({"parts": parts.tolist(), "whole": whole})
  return {"check": check.tolist(), "first": first, "rss_loaded": rss_loaded,
          "rss_peak": rss_peak_gb(), "params": sum(x.numel() for x in policy.parameters()),
          "parts": np.min([r[0] for r in runs], axis=0).tolist() if runs else None}


class TorchChild:
  """The PyTorch step in a child process (clean peak RSS, no JAX threads), driven step by step:
  `step()` runs one timed step there and returns (phase seconds, whole seconds), so the parent
  can alternate its own steps with torch's and both meet the same host load."""

  def __init__(self, workdir: str, glibc_defaults: bool = False):
    # The child inherits the environment, and with it the glibc malloc setting, unless
    # glibc_defaults: then it runs under glibc's defaults, as a plain PyTorch script does.
    env = {k: v for k, v in os.environ.items() if not (glibc_defaults and k == "GLIBC_TUNABLES")}
    self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--torch-child",
                                  workdir], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True, env=env)
    self._read()                                # loaded, first step done

  def _read(self) -> dict:
    for line in self.proc.stdout:
      if line.startswith(_TAG):
        return json.loads(line[len(_TAG):])
      print(line, end="")                       # the child's own output
    raise RuntimeError(f"the torch child exited (rc {self.proc.wait()})")

  def _send(self, command: str) -> dict:
    self.proc.stdin.write(command + "\n")
    self.proc.stdin.flush()
    return self._read()

  def step(self) -> tuple[list[float], float]:
    out = self._send("step")
    return out["parts"], out["whole"]

  def finish(self) -> dict:
    out = self._send("done")
    self.proc.wait()
    return out


_TAG = "@@torch "


def reply(obj: dict) -> None:
  """The torch child's answer to its parent, one tagged line on stdout."""
  sys.stdout.write(_TAG + json.dumps(obj) + "\n")
  sys.stdout.flush()


# --------------------------------------------------------------------------------------- bond

def bond_side(args, model_config, params, tokens, weights, check, torch_child=None):
  import jax
  import jax.numpy as jnp
  import optax

  import sampler   # benchmarks/sampler.py (this script's directory is on sys.path)
  from bond import anchor as anchor_lib
  from bond import rewards, rollout as rollout_lib, sampling, steps

  config = jbond_config(args.preset, args.new_tokens, args.anchor_logp)
  mc = model_config
  sc, b, t = config.sampling, tokens.shape[0], args.new_tokens
  reward_fn = rewards.bag_of_tokens_reward(weights)
  optimizer = steps.make_optimizer(config.optim)
  batch = {"prompt_tokens": jnp.asarray(tokens), "prompt_mask": jnp.ones(tokens.shape, bool)}
  block = lambda tree: jax.tree.map(lambda x: x.block_until_ready(), tree)  # noqa: E731
  n = args.steps
  out = {}

  def timed(name, fn):
    """(first call, best of n) seconds of fn(), which blocks."""
    first = sampler.best_time(fn, 1)
    out[name] = (first, sampler.best_time(fn, n))
    print(f"  bond {name:<28} {out[name][1] * 1e3:9.1f} ms   (first call {first:.1f} s)",
          flush=True)

  # Same weights as torch: teacher-forced log-probs of the check completions.
  lp = rollout_lib.completion_log_probs(mc, params, batch["prompt_tokens"], batch["prompt_mask"],
                                        jnp.asarray(check)[:, None], jnp.ones((b, 1, t), bool))
  out["check"] = np.asarray(lp)[:, 0]

  rollout_fn = rollout_lib.make_rollout_fn(config, mc, reward_fn)
  update_fn = steps.make_update_fn(config, mc, optimizer)
  # As bond/train.py runs a step it does not log: without the metric-only π_ref pass (the torch
  # step has none either); logged steps add it ("no-grad: ref on y" below).
  jit_rollout = jax.jit(lambda s, b: rollout_fn(s, b, None, False))
  jit_update = jax.jit(update_fn, donate_argnums=0)
  state = [steps.init_state(params, optimizer, seed=0)]
  out["rss_loaded"] = rss_now_gb()

  # Whole step as bond/train.py runs it: the two jitted stages, the update donated.
  def two_jits():
    state[0], metrics = jit_update(state[0], jit_rollout(state[0], batch))
    block((state[0], metrics))
  # Whole steps alternate with torch's (one each in turn): a busy spell of the shared host then
  # slows both sides, not one.
  first = sampler.best_time(two_jits, 1)
  pairs = []
  for _ in range(n):
    ours = sampler.best_time(two_jits, 1)
    pairs.append((ours, torch_child.step() if torch_child is not None else None))
  out["pairs"] = pairs
  out["step (rollout + update jits)"] = (first, min(p[0] for p in pairs))
  print(f"  bond {'step (rollout + update jits)':<28} "
        f"{out['step (rollout + update jits)'][1] * 1e3:9.1f} ms   (first call {first:.1f} s)"
        + ("; torch steps in between" if torch_child is not None else ""), flush=True)
  out["rss_step"] = rss_peak_gb()

  # The stages alone (the update needs a fresh rollout input, not donated).
  rollout = block(jit_rollout(state[0], batch))
  timed("  rollout jit", lambda: block(jit_rollout(state[0], batch)))

  def update_only():
    state[0], metrics = jit_update(state[0], rollout)
    block((state[0], metrics))
  timed("  update jit (donated)", update_only)

  if not args.skip_single_jit:   # steps.make_train_step in one jit, donated
    train_step = steps.make_train_step(config, mc, reward_fn, optimizer)
    jit_step = jax.jit(lambda s, b: train_step(s, b, None, False), donate_argnums=0)

    def one_jit():
      state[0], metrics = jit_step(state[0], batch)
      block((state[0], metrics))
    timed("step (make_train_step, 1 jit)", one_jit)

  # Phases: separately jitted sub-functions built from the same pieces as the rollout/update.
  s = state[0]
  rng = jax.random.fold_in(s.rng, s.step)

  in_decode = config.bond.anchor_logp == "decode"

  @jax.jit
  def sample_both(anchor_params, params, rng):
    rng_anchor, rng_policy = jax.random.split(rng)
    draw = lambda p, r, k, **kw: sampling.sample_fn(  # noqa: E731
        mc, p, batch["prompt_tokens"], batch["prompt_mask"], r, max_new_tokens=t, num_samples=k,
        temperature=sc.temperature, top_k=sc.top_k, top_p=sc.top_p, eos_id=mc.eos_id, **kw)
    policy = draw(params, rng_policy, 1)
    # bond.anchor_logp='decode': the anchor's loop also scores the policy's samples.
    forced = dict(forced_tokens=policy.tokens, forced_mask=policy.mask) if in_decode else {}
    return draw(anchor_params, rng_anchor, NUM_ANCHOR, **forced), policy
  timed("sampling (2 anchor + 1 policy)",
        lambda: block(sample_both(s.anchor_params, s.params, rng)))

  samples = jnp.concatenate([rollout.anchor.tokens, rollout.policy.tokens], axis=1)   # [B, 3, T]
  samples_mask = jnp.concatenate([rollout.anchor.mask, rollout.policy.mask], axis=1)

  @jax.jit
  def score(tokens, mask):
    rep = lambda x: jnp.repeat(x, NUM_ANCHOR + 1, axis=0)  # noqa: E731
    return reward_fn(rep(batch["prompt_tokens"]), rep(batch["prompt_mask"]),
                     tokens.reshape(b * 3, t), mask.reshape(b * 3, t)).reshape(b, 3)
  timed("rewards", lambda: block(score(samples, samples_mask)))

  @jax.jit
  def no_grad_pass(p, tokens, mask):
    return rollout_lib.completion_log_probs(mc, p, batch["prompt_tokens"], batch["prompt_mask"],
                                            tokens, mask)
  y, y_mask = rollout.policy.tokens, rollout.policy.mask
  if in_decode:      # scored inside the anchor's sampling loop: no pass of its own
    out["no-grad: anchor on y"] = (0.0, 0.0)
  else:
    timed("no-grad: anchor on y", lambda: block(no_grad_pass(s.anchor_params, y, y_mask)))
  timed("no-grad: ref on y (metric only)", lambda: block(no_grad_pass(s.ref_params, y, y_mask)))

  loss_fn = steps.make_loss_fn(config, mc)
  grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  timed("fwd+bwd (loss, 2 rows/prompt)", lambda: block(grad_fn(s.params, rollout)))
  grads = block(grad_fn(s.params, rollout)[1])

  # update_fn after value_and_grad, the state donated as in the update jit (undonated, every
  # call also allocates and first-touches fresh outputs: 78-95 ms against 66-84 on the 35M).
  del s

  @functools.partial(jax.jit, donate_argnums=0)
  def optimizer_and_anchor(s, grads):
    updates, opt_state = optimizer.update(grads, s.opt_state, s.params)
    params = optax.apply_updates(s.params, updates)
    anchor = anchor_lib.ema_update(s.anchor_params, params, ETA)
    return (s.replace(params=params, opt_state=opt_state, anchor_params=anchor),
            optax.global_norm(params), optax.global_norm(grads))

  def optimizer_only():
    state[0], *norms = optimizer_and_anchor(state[0], grads)
    block((state[0], norms))
  timed("optimizer + anchor", optimizer_only)
  out["rss_peak"] = rss_peak_gb()
  return out


# --------------------------------------------------------------------------------------- main

def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--preset", default="gemma3_35m")
  parser.add_argument("--gguf", action="store_true", help="the real Gemma 3 270M (GGUF)")
  parser.add_argument("--prompts", type=int, default=None, help="default 16 (--gguf: 4)")
  parser.add_argument("--prompt-len", type=int, default=None, help="default 16 (--gguf: 12)")
  parser.add_argument("--new-tokens", type=int, default=None, help="default 32")
  parser.add_argument("--steps", type=int, default=None,
                      help="timed steps of each side, alternated (default 5)")
  parser.add_argument("--skip-torch", action="store_true")
  parser.add_argument("--anchor-logp", choices=("decode", "pass"), default="decode",
                      help="bond.anchor_logp: log π_anchor of the policy samples scored in the "
                           "anchor's decode loop (default) or by a teacher-forced pass")
  parser.add_argument("--scan-layers", action="store_true",
                      help="model.scan_layers=True: full passes scan over the layers")
  parser.add_argument("--skip-single-jit", action="store_true",
                      help="do not also time steps.make_train_step as one jit")
  parser.add_argument("--smoke", action="store_true", help="tiny_gemma3, 4 x 8 + 8 tokens")
  parser.add_argument("--malloc-hugepages", choices=("on", "off"), default="on",
                      help="run with glibc's huge pages for large buffers, as `python -m "
                           "bond.main` does for this model (bond/hugepages.py; both sides)")
  parser.add_argument("--torch-glibc-defaults", action="store_true",
                      help="run the torch side under glibc's default malloc (as a plain PyTorch "
                           "script runs) instead of bond's setting")
  parser.add_argument("--torch-child", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if not args.torch_child:     # re-executes this script; the torch child inherits the setting
    from bond import hugepages
    hugepages.maybe_reexec(args.malloc_hugepages == "on")
  if args.torch_child:
    reply(torch_side(args.torch_child, sys.stdin))
    return
  small = (4, 12) if args.gguf else (4, 8) if args.smoke else (16, 16)
  args.prompts = args.prompts or small[0]
  args.prompt_len = args.prompt_len or small[1]
  args.new_tokens = args.new_tokens or (8 if args.smoke else 32)
  args.steps = args.steps or (1 if args.smoke else 5)
  if args.smoke:
    args.preset, args.skip_single_jit = "tiny_gemma3", True

  import jax
  import jax.numpy as jnp

  import sampler   # benchmarks/sampler.py
  from bond.models import convert, gemma, presets
  load = os.getloadavg()
  start = time.perf_counter()
  peak = sampler.matmul_peak(jnp.bfloat16)
  bandwidth = sampler.memory_bandwidth()
  if args.gguf:
    from bond import assets
    name = "Gemma 3 270M (GGUF)"
    model_config, params = convert.from_gguf(assets.gemma3_270m_gguf_path())
    model_config = model_config.replace(dtype=jnp.bfloat16, param_dtype=jnp.float32)
  else:
    name = args.preset
    model_config = presets.get(args.preset, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    params = gemma.init_params(model_config.replace(dtype=jnp.float32), jax.random.key(0))
  model_config = model_config.replace(scan_layers=args.scan_layers)
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  b, p, t = args.prompts, args.prompt_len, args.new_tokens
  tokens, _ = sampler.prompts(model_config, b, p)
  weights = reward_weights(model_config.vocab_size)
  check = np.random.default_rng(2).integers(3, min(model_config.vocab_size, 30_000), (b, t))
  print(f"{name}: {n_params / 1e6:.1f}M params (vocab {model_config.vocab_size}), {b} prompts x "
        f"({p} + {t}) tokens, 2 anchor + 1 policy samples, f32 params, bf16 compute; "
        f"{args.steps} timed steps, best of each"
        + ("; layers scanned (model.scan_layers)" if args.scan_layers else ""))
  print(f"devices: {jax.devices()}  load average at start: {load[0]:.2f} {load[1]:.2f} "
        f"{load[2]:.2f}  measured bf16 matmul peak: {peak / 1e9:.0f} GFLOP/s  persistent "
        f"compilation cache: {jax.config.jax_compilation_cache_dir or 'off'}  "
        f"{hugepages.status()}"
        + ("; torch under glibc's defaults" if args.torch_glibc_defaults else "; torch likewise"),
        flush=True)

  torch_result = None
  hf_config = model_config
  model_config = model_config.replace(eos_id=-1)     # no eos: every row has new_tokens tokens
  with tempfile.TemporaryDirectory() as workdir:
    child = None
    if not args.skip_torch:
      convert.to_hf(hf_config, params, os.path.join(workdir, "hf"))
      np.savez(os.path.join(workdir, "data.npz"), prompts=tokens, weights=weights, check=check,
               new_tokens=t)
      print("torch: loading in a child process (its steps alternate with bond's) ...", flush=True)
      child = TorchChild(workdir, args.torch_glibc_defaults)
    try:
      ours = bond_side(args, model_config, params, tokens, weights, check, child)
    finally:
      if child is not None:
        torch_result = child.finish()
  if torch_result:
    runs = [p[1] for p in ours["pairs"]]
    torch_result["whole"] = min(r[1] for r in runs)

  # ---- table
  grad_tokens = 2 * b * (p + t)                      # policy on [best anchor; y], prompt included
  flops = 6 * n_params * grad_tokens
  bond_parts = [ours["sampling (2 anchor + 1 policy)"][1], ours["rewards"][1],
                ours["no-grad: anchor on y"][1],
                ours["fwd+bwd (loss, 2 rows/prompt)"][1], ours["optimizer + anchor"][1]]
  bond_whole = ours["step (rollout + update jits)"][1]
  names = ["sampling (2 anchor + 1 policy)", "rewards", "no-grad passes",
           "fwd+bwd (2 grad rows/prompt)", "optimizer + anchor"]
  torch_parts = torch_result["parts"] if torch_result else [float("nan")] * 5
  torch_whole = torch_result["whole"] if torch_result else float("nan")
  print()
  print(f"{'phase':<34} {'bond ms':>9} {'torch ms':>9} {'torch/bond':>10}")
  for nm, ob, tb in zip(names, bond_parts, torch_parts):
    print(f"{nm:<34} {ob * 1e3:>9.1f} {tb * 1e3:>9.1f} "
          + (f"{tb / ob:>10.2f}" if ob else f"{'(none)':>10}"))
  print(f"{'sum of parts':<34} {sum(bond_parts) * 1e3:>9.1f} {sum(torch_parts) * 1e3:>9.1f}")
  print(f"{'whole step (timed apart)':<34} {bond_whole * 1e3:>9.1f} {torch_whole * 1e3:>9.1f} "
        f"{torch_whole / bond_whole:>10.2f}")
  print(f"{'whole / sum of parts':<34} {bond_whole / sum(bond_parts):>9.2f} "
        f"{torch_whole / sum(torch_parts):>9.2f}")
  if not args.skip_single_jit:
    one = ours["step (make_train_step, 1 jit)"][1]
    print(f"{'step, make_train_step in 1 jit':<34} {one * 1e3:>9.1f} {'':>9} "
          f"{torch_whole / one:>10.2f}")
  print("bond: each phase is its own jit (best of the timed calls); 'whole step' = rollout jit +\n"
        "  donated update jit, as bond/train.py runs a step it does not log; no-grad = anchor on\n"
        "  y (logged steps add the ref pass on y that feeds only kl/policy_ref: "
        f"{ours['no-grad: ref on y (metric only)'][1] * 1e3:.1f} ms).\n"
        "  torch: phases timed inside the same eager steps (best per phase over the steps), no\n"
        "  ref pass; sampling = 2 generate calls.")
  mfu = lambda s: flops / s / peak  # noqa: E731
  print(f"fwd+bwd MFU (6 x {n_params / 1e6:.1f}M params x {grad_tokens} tokens = "
        f"{flops / 1e9:.1f} GFLOP, peak {peak / 1e9:.0f} GFLOP/s): bond "
        f"{flops / bond_parts[3] / 1e9:.0f} GFLOP/s = {mfu(bond_parts[3]):.0%}, torch "
        f"{flops / torch_parts[3] / 1e9:.0f} GFLOP/s = {mfu(torch_parts[3]):.0%}")
  floor_peak = max(peak, flops / torch_parts[3] if torch_result else 0.)
  floor = step_floor(model_config, params, b, p, t, floor_peak, bandwidth, args.anchor_logp)
  # bond's fwd+bwd does less than 6 x params x tokens (each prompt once, the vocabulary only at
  # completion positions): its own rate is its floor's FLOPs over its time.
  floor_peak = max(floor_peak, floor["fwd+bwd"] * floor_peak / bond_parts[3])
  floor = step_floor(model_config, params, b, p, t, floor_peak, bandwidth, args.anchor_logp)
  total = sum(floor.values())
  print(f"roofline floor of bond's step (peak {floor_peak / 1e9:.0f} GFLOP/s, the highest bf16 "
        f"matmul rate of this run: the probe, bond's or torch's fwd+bwd; memory {bandwidth / 1e9:.1f}"
        f" GB/s): " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in floor.items() if v)
        + f"; total {total * 1e3:.1f} ms; bond's whole step runs at {total / bond_whole:.0%} of roofline "
        "speed (floor / step)")
  if torch_result:
    target = torch_whole / 3
    print(f"3x the torch step needs bond's step <= {target * 1e3:.1f} ms: "
          + (f"beyond this host (at its floor bond's step would be {torch_whole / total:.2f}x)"
             if total > target else f"the step at >= {total / target:.0%} of roofline speed"))
  first_two = ours["step (rollout + update jits)"][0]
  print(f"compile (first call - steady state): bond step {first_two - bond_whole:.1f} s"
        + (f", make_train_step {ours['step (make_train_step, 1 jit)'][0] - one:.1f} s"
           if not args.skip_single_jit else "")
        + (f"; torch first step - steady state {torch_result['first'] - torch_whole:.1f} s"
           if torch_result else ""))
  print(f"RSS GB: bond after load {ours['rss_loaded']:.2f}, peak through the timed steps "
        f"{ours['rss_step']:.2f}, peak incl. phase benchmarks {ours['rss_peak']:.2f}"
        + (f"; torch (child) after load {torch_result['rss_loaded']:.2f}, peak "
           f"{torch_result['rss_peak']:.2f}" if torch_result else ""))
  if torch_result:
    diff = np.abs(np.asarray(torch_result["check"]) - ours["check"])
    print(f"same weights: teacher-forced log-probs of fixed completions, bond vs torch (bf16): "
          f"max |diff| {diff.max():.3f} over |log p| ~ {np.abs(ours['check']).mean():.1f}")
  if torch_result:
    ratios = sorted(tp[1] / ob for ob, tp in ours["pairs"])
    print("whole steps in alternation, bond / torch ms: " + ", ".join(
        f"{ob * 1e3:.0f} / {tp[1] * 1e3:.0f}" for ob, tp in ours["pairs"])
        + f"; per-pair ratio median {float(np.median(ratios)):.2f}x (range {ratios[0]:.2f}-"
        f"{ratios[-1]:.2f})")
  print(f"ratio torch/bond per whole step (best / best): {torch_whole / bond_whole:.2f}x   "
        f"(total wall "
        f"{time.perf_counter() - start:.0f} s, load average at end {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
  main()
