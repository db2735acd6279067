"""The pure update stage: `update_fn(state, rollout) -> (state, metrics)`.

A training step is two jitted stages (docs: design.md): `rollout.make_rollout_fn` samples,
rewards and scores without gradients; `update_fn` takes `value_and_grad` of the loss registered
for `config.bond.objective` (`objectives.OBJECTIVES`), applies optax, then the anchor rule:
fixed (= π_ref, plain BOND), hard-swapped every K steps (iterative BOND, Algorithm 1) or an EMA
of the policy (J-BOND). Sampling never runs inside autodiff. One `TrainState` pytree holds
everything a step changes (and orbax saves). `make_train_step` composes the two stages.

  online (batch = prompts):  'bond_fwd', 'bond_bwd', 'bond_jeffreys' (BOND §3), 'jbond'
                             (BOND Algorithm 2), 'reinforce' (REINFORCE + KL, RLOO)
  offline (batch = prompts + chosen/rejected completions): 'sft', 'dpo', 'ipo', 'bonbon',
                             'bonbon_dpo' (BoNBoN with the authors' code's DPO term)
"""

from __future__ import annotations

from typing import Any, Callable

import chex
import flax.struct
import jax
import jax.numpy as jnp
import optax

from bond import anchor as anchor_lib
from bond import lora as lora_lib
from bond import objectives
from bond import rollout as rollout_lib
from bond.models import gemma

Params = Any
RewardFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]

ONLINE = tuple(k for k, a in objectives.OBJECTIVES.items() if not a.offline)
OFFLINE = tuple(k for k, a in objectives.OBJECTIVES.items() if a.offline)


@flax.struct.dataclass
class TrainState:
  """What a step changes. Full fine-tuning: params, anchor_params and ref_params are model
  params. LoRA (`lora` set): params and anchor_params are adapters and ref_params is the one
  frozen base; `policy()`, `anchor()` and `reference()` are the model params either way."""

  step: jax.Array
  params: Params
  opt_state: Any
  anchor_params: Params
  ref_params: Params
  rng: jax.Array
  lora: lora_lib.Spec | None = flax.struct.field(pytree_node=False, default=None)

  def policy(self) -> Params:
    return self.params if self.lora is None else lora_lib.merge(self.lora, self.ref_params,
                                                                self.params)

  def anchor(self) -> Params:
    return self.anchor_params if self.lora is None else lora_lib.merge(
        self.lora, self.ref_params, self.anchor_params)

  def reference(self) -> Params:
    return lora_lib.reference(self.lora, self.ref_params)


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
               ref_params: Params | None = None, lora: lora_lib.Spec | None = None) -> TrainState:
  """Full fine-tuning: policy and anchor start at `params`, the reference is `ref_params`
  (default `params`). With `lora`: `params` are the model's params, made into the frozen base
  (`lora_lib.make_base`, stored once); policy and anchor adapters start equal (B = 0)."""
  # Separate buffers: the step donates its state, and params/anchor/ref are updated apart.
  copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731
  if lora is not None:
    if ref_params is not None:
      raise ValueError("with LoRA the reference is the frozen base itself: pass no ref_params")
    base = lora_lib.make_base(lora, params)
    adapters = lora_lib.init_adapters(lora, base, jax.random.PRNGKey(seed + 1))
    return TrainState(step=jnp.zeros((), jnp.int32), params=adapters,
                      opt_state=optimizer.init(adapters), anchor_params=copy(adapters),
                      ref_params=base, rng=jax.random.PRNGKey(seed), lora=lora)
  ref_params = copy(params if ref_params is None else ref_params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=copy(params),
                    opt_state=optimizer.init(params), anchor_params=copy(ref_params),
                    ref_params=ref_params, rng=jax.random.PRNGKey(seed))


def make_loss_fn(config, model_config: gemma.GemmaConfig, lora: lora_lib.Spec | None = None):
  """`loss_fn(params, rollout, base=None) -> (loss, metrics)`: the registered loss of
  config.bond.objective. With `lora`, params are adapters on the frozen `base` (no gradient)."""
  algorithm = objectives.get_objective(config.bond.objective)
  options = rollout_lib.logprob_options(config)

  def loss_fn(params: Params, rollout: rollout_lib.Rollout, base: Params = None):
    def logp(p, samples):
      p = p if lora is None else lora_lib.merge(lora, base, p)
      return rollout_lib.completion_log_probs(model_config, p, rollout.prompt_tokens,
                                              rollout.prompt_mask, samples.tokens, samples.mask,
                                              **options)
    # One pass over all of a loss's sample sets where the vocabulary projection is chunked
    # (`objectives._pass`).
    logp.one_pass = rollout_lib.is_chunked(model_config, options["chunk_size"])
    return algorithm.loss(params, rollout, config.bond, logp)

  return loss_fn


def make_update_fn(config, model_config: gemma.GemmaConfig,
                   optimizer: optax.GradientTransformation):
  """`update_fn(state, rollout) -> (state, metrics)`: grads of the loss, optax, anchor rule."""
  bc = config.bond

  def update_fn(state: TrainState, rollout: rollout_lib.Rollout):
    loss_fn = make_loss_fn(config, model_config, state.lora)
    base = None if state.lora is None else jax.lax.stop_gradient(state.ref_params)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, rollout, base)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    step = state.step + 1
    anchor_params = state.anchor_params
    if bc.anchor == "ema":
      anchor_params = anchor_lib.ema_update(anchor_params, params, bc.eta)
    elif bc.anchor == "swap":
      anchor_params = anchor_lib.maybe_swap(anchor_params, params, step, bc.swap_every)
    metrics = dict(metrics, **rollout_lib.metrics(rollout), loss=loss, **{
        "params/global_norm": optax.global_norm(params),
        "grads/global_norm": optax.global_norm(grads)})
    return state.replace(step=step, params=params, opt_state=opt_state,
                         anchor_params=anchor_params), metrics

  return update_fn


def make_train_step(config, model_config: gemma.GemmaConfig, reward_fn: RewardFn | None,
                    optimizer: optax.GradientTransformation):
  """`train_step(state, batch, rng=None, with_metrics=True) -> (state, metrics)`: rollout, then
  update. with_metrics=False skips metric-only passes (`rollout.make_rollout_fn`).

  A convenience composition (one jit); the training loop jits the two stages apart.
  """
  rollout_fn = rollout_lib.make_rollout_fn(config, model_config, reward_fn)
  update_fn = make_update_fn(config, model_config, optimizer)

  def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array | None = None,
                 with_metrics: bool | jax.Array = True):
    chex.assert_rank(batch["prompt_tokens"], 2)
    return update_fn(state, rollout_fn(state, batch, rng, with_metrics))

  return train_step
