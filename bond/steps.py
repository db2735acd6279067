"""Pure train steps: sampler -> reward -> objective -> optax update -> anchor update.

One `TrainState` pytree holds everything a step changes (and orbax saves). `make_train_step`
returns `train_step(state, batch, rng=None) -> (state, metrics)` for the objective named in
`config.bond.objective`:

  online (sample inside the step; batch = prompts):
    'bond_fwd', 'bond_bwd', 'bond_jeffreys'   BOND §3 against Best-of-N of the anchor
    'jbond'                                   BOND Algorithm 2 (2 anchor + 1 policy sample)
    'reinforce'                               REINFORCE with KL penalty and RLOO baseline
  offline (batch = prompts + chosen/rejected completions, e.g. best/worst-of-n):
    'sft', 'dpo', 'ipo', 'bonbon'

The anchor is the BoN base policy: fixed (= π_ref, plain BOND), hard-swapped every K steps
(iterative BOND, Algorithm 1) or an EMA of the policy (J-BOND).
"""

from __future__ import annotations

from typing import Any, Callable

import chex
import flax.struct
import jax
import jax.numpy as jnp
import optax

from bond import anchor as anchor_lib
from bond import bon
from bond import objectives
from bond import sampling
from bond.models import gemma

Params = Any
RewardFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]

ONLINE = ("bond_fwd", "bond_bwd", "bond_jeffreys", "jbond", "reinforce")
OFFLINE = ("sft", "dpo", "ipo", "bonbon")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Params
  opt_state: Any
  anchor_params: Params
  ref_params: Params
  rng: jax.Array


def make_optimizer(optim_config) -> optax.GradientTransformation:
  """Adam with linear warm-up (BOND paper: lr 3e-6, 100 warm-up steps), optional clipping.

  The warm-up starts at lr 0 on the first update; warmup_steps = 0 means the full lr from it.
  """
  schedule = (optax.linear_schedule(0.0, optim_config.lr, optim_config.warmup_steps)
              if optim_config.warmup_steps > 0 else optax.constant_schedule(optim_config.lr))
  chain = []
  if optim_config.grad_clip > 0:
    chain.append(optax.clip_by_global_norm(optim_config.grad_clip))
  chain.append(optax.adamw(schedule, b1=optim_config.b1, b2=optim_config.b2,
                           weight_decay=optim_config.weight_decay))
  return optax.chain(*chain)


def init_state(params: Params, optimizer: optax.GradientTransformation, seed: int,
               ref_params: Params | None = None) -> TrainState:
  # Separate buffers: the step donates its state, and params/anchor/ref are updated apart.
  copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731
  ref_params = copy(params if ref_params is None else ref_params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=copy(params),
                    opt_state=optimizer.init(params), anchor_params=copy(ref_params),
                    ref_params=ref_params, rng=jax.random.PRNGKey(seed))


def completion_log_probs(model_config: gemma.GemmaConfig, params: Params, prompt_tokens,
                         prompt_mask, completion_tokens, completion_mask) -> jax.Array:
  """log π(y|x) summed over the completion mask: one teacher-forced pass over [x; y] -> [B]."""
  p = prompt_tokens.shape[1]
  tokens = jnp.concatenate([prompt_tokens, completion_tokens], axis=1)          # [B, P+T]
  mask = jnp.concatenate([prompt_mask, completion_mask], axis=1).astype(jnp.bool_)
  logits = gemma.Gemma(model_config).apply({"params": params}, tokens, attention_mask=mask)
  # logits at position P-1+t predict completion token t.
  return objectives.sequence_log_probs(logits[:, p - 1:-1], completion_tokens, completion_mask)


def _flat(x):
  """[B, N, ...] -> [B*N, ...]."""
  return x.reshape((-1,) + x.shape[2:])


def _repeat_prompts(prompt_tokens, prompt_mask, n):
  return jnp.repeat(prompt_tokens, n, axis=0), jnp.repeat(prompt_mask, n, axis=0)


class _Scorer:
  """Log-probs and rewards of [B, N, T] completions of a prompt batch."""

  def __init__(self, model_config, reward_fn, prompt_tokens, prompt_mask):
    self.model_config, self.reward_fn = model_config, reward_fn
    self.prompt_tokens, self.prompt_mask = prompt_tokens, prompt_mask

  def _prompts(self, n):
    return _repeat_prompts(self.prompt_tokens, self.prompt_mask, n)

  def log_probs(self, params, tokens, mask):            # [B, N, T] -> [B, N]
    b, n = tokens.shape[:2]
    pt, pm = self._prompts(n)
    lp = completion_log_probs(self.model_config, params, pt, pm, _flat(tokens), _flat(mask))
    return lp.reshape(b, n)

  def rewards(self, tokens, mask):                       # [B, N, T] -> [B, N]
    b, n = tokens.shape[:2]
    pt, pm = self._prompts(n)
    return self.reward_fn(pt, pm, _flat(tokens), _flat(mask)).reshape(b, n).astype(jnp.float32)


def _take(x, idx):
  """x [B, N, ...], idx [B] -> [B, ...]."""
  return jnp.take_along_axis(x, idx.reshape((-1, 1) + (1,) * (x.ndim - 2)), axis=1)[:, 0]


def make_train_step(config, model_config: gemma.GemmaConfig, reward_fn: RewardFn | None,
                    optimizer: optax.GradientTransformation):
  """Builds the pure `train_step(state, batch, rng=None) -> (state, metrics)` for `config`."""
  bc, sc = config.bond, config.sampling
  objective = bc.objective
  if objective not in ONLINE + OFFLINE:
    raise ValueError(f"bond.objective must be one of {ONLINE + OFFLINE}, got {objective!r}")

  def draw(params, prompt_tokens, prompt_mask, rng, n):
    return sampling.sample_fn(
        model_config, params, prompt_tokens, prompt_mask, rng, max_new_tokens=sc.max_new_tokens,
        num_samples=n, temperature=sc.temperature, top_k=sc.top_k, top_p=sc.top_p,
        eos_id=model_config.eos_id)

  def online_loss(params, state, batch, rng):
    pt, pm = batch["prompt_tokens"], batch["prompt_mask"]
    scorer = _Scorer(model_config, reward_fn, pt, pm)
    rng_anchor, rng_policy = jax.random.split(rng)
    metrics = {}
    if objective == "jbond":
      anchor_out = draw(state.anchor_params, pt, pm, rng_anchor, 2)
      policy_out = draw(params, pt, pm, rng_policy, 1)
      anchor_r = scorer.rewards(anchor_out.tokens, anchor_out.mask)                 # [B, 2]
      policy_r = scorer.rewards(policy_out.tokens, policy_out.mask)                 # [B, 1]
      best, _ = bon.select_best_worst(anchor_r)
      best_tokens, best_mask = _take(anchor_out.tokens, best), _take(anchor_out.mask, best)
      lp_best = scorer.log_probs(params, best_tokens[:, None], best_mask[:, None])[:, 0]
      lp_y = scorer.log_probs(params, policy_out.tokens, policy_out.mask)[:, 0]
      lp_anchor_y = jax.lax.stop_gradient(
          scorer.log_probs(state.anchor_params, policy_out.tokens, policy_out.mask)[:, 0])
      # J-BOND reward: 0 if y is not worse than at least one anchor sample (p̂≤ > 0).
      beats = policy_r[:, 0] >= jnp.min(anchor_r, axis=1)
      loss, m = objectives.jbond_loss(lp_best, lp_y, lp_anchor_y, beats, beta=bc.beta,
                                      gamma=bc.gamma, penalty=bc.jbond_penalty)
      metrics.update(m)
      policy_tokens, policy_mask, policy_rewards, lp_policy = (
          policy_out.tokens, policy_out.mask, policy_r, lp_y[:, None])
    elif objective == "reinforce":
      out = draw(params, pt, pm, rng_policy, bc.num_policy_samples)
      r = scorer.rewards(out.tokens, out.mask)
      lp = scorer.log_probs(params, out.tokens, out.mask)
      lp_ref = jax.lax.stop_gradient(scorer.log_probs(state.ref_params, out.tokens, out.mask))
      loss, m = objectives.reinforce_loss(lp, lp_ref, r, beta_rl=bc.beta_rl)
      metrics.update(m)
      policy_tokens, policy_mask, policy_rewards, lp_policy = out.tokens, out.mask, r, lp
    else:  # BOND against Best-of-N of the anchor, Jeffreys mix with beta.
      beta = {"bond_fwd": 0.0, "bond_bwd": 1.0, "bond_jeffreys": bc.beta}[objective]
      num_anchor = max(bc.n, bc.k)
      anchor_out = draw(state.anchor_params, pt, pm, rng_anchor, num_anchor)
      anchor_r = scorer.rewards(anchor_out.tokens, anchor_out.mask)                 # [B, max(N,k)]
      best, _ = bon.select_best_worst(anchor_r[:, :bc.n])
      best_tokens, best_mask = _take(anchor_out.tokens, best), _take(anchor_out.mask, best)
      fwd_loss = jnp.zeros(())
      if beta < 1.0:
        lp_best = scorer.log_probs(params, best_tokens[:, None], best_mask[:, None])[:, 0]
        fwd_loss, m = objectives.forward_kl_loss(lp_best)
        metrics.update({f"fwd/{k}": v for k, v in m.items()})
      out = draw(params, pt, pm, rng_policy, bc.num_policy_samples)
      r = scorer.rewards(out.tokens, out.mask)
      lp = scorer.log_probs(params, out.tokens, out.mask)
      bwd_loss = jnp.zeros(())
      if beta > 0.0:
        lp_anchor = jax.lax.stop_gradient(scorer.log_probs(state.anchor_params, out.tokens, out.mask))
        log_q = bon.log_quantile_estimate(r, anchor_r[:, :bc.k], smoothing=bc.quantile_smoothing)
        bwd_loss, m = objectives.backward_kl_loss(lp, lp_anchor, log_q, n=bc.n)
        metrics.update({f"bwd/{k}": v for k, v in m.items()})
      loss = (1.0 - beta) * fwd_loss + beta * bwd_loss
      policy_tokens, policy_mask, policy_rewards, lp_policy = out.tokens, out.mask, r, lp
    lp_ref = scorer.log_probs(state.ref_params, policy_tokens, policy_mask)
    metrics["reward/mean"] = jnp.mean(policy_rewards)
    metrics["kl/policy_ref"] = jnp.mean(jax.lax.stop_gradient(lp_policy) - lp_ref)
    metrics["length/mean"] = jnp.mean(jnp.sum(policy_mask, axis=-1))
    return loss, metrics

  def offline_loss(params, state, batch, rng):
    del rng
    pt, pm = batch["prompt_tokens"], batch["prompt_mask"]
    lp = lambda p, name: completion_log_probs(  # noqa: E731
        model_config, p, pt, pm, batch[f"{name}_tokens"], batch[f"{name}_mask"])
    lp_w = lp(params, "chosen")
    if objective == "sft":
      return objectives.sft_loss(lp_w)
    lp_l = lp(params, "rejected")
    ref_w = jax.lax.stop_gradient(lp(state.ref_params, "chosen"))
    ref_l = jax.lax.stop_gradient(lp(state.ref_params, "rejected"))
    if objective == "bonbon":
      return objectives.bonbon_loss(lp_w, lp_l, ref_w, ref_l, alpha=bc.alpha, beta=bc.beta_ipo)
    fn = objectives.dpo_loss if objective == "dpo" else objectives.ipo_loss
    return fn(lp_w, lp_l, ref_w, ref_l, beta=bc.beta_ipo)

  loss_impl = online_loss if objective in ONLINE else offline_loss

  def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array | None = None):
    chex.assert_rank(batch["prompt_tokens"], 2)
    if rng is None:
      rng = jax.random.fold_in(state.rng, state.step)
    (loss, metrics), grads = jax.value_and_grad(loss_impl, has_aux=True)(
        state.params, state, batch, rng)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    step = state.step + 1
    anchor_params = state.anchor_params
    if bc.anchor == "ema":
      anchor_params = anchor_lib.ema_update(anchor_params, params, bc.eta)
    elif bc.anchor == "swap":
      anchor_params = anchor_lib.maybe_swap(anchor_params, params, step, bc.swap_every)
    metrics = dict(metrics, loss=loss, **{
        "params/global_norm": optax.global_norm(params),
        "grads/global_norm": optax.global_norm(grads)})
    new_state = state.replace(step=step, params=params, opt_state=opt_state,
                              anchor_params=anchor_params)
    return new_state, metrics

  return train_step
