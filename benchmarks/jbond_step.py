"""One J-BOND step through `steps.make_train_step` (one jit, donated): gemma3_35m, bf16 compute,
16 prompts x (16 + 32) tokens, no eos. Uses only APIs that every commit since session 1 has, so
the same file times old and new code (`git worktree add /tmp/old REV; cd /tmp/old;
PYTHONPATH=. python /path/to/benchmarks/jbond_step.py old`). For the per-phase split and the
PyTorch baseline use benchmarks/train_step.py."""
import sys, time
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, ".")
from configs import default
from bond import rewards, steps
from bond.models import gemma, presets
c = default.get_config()
c.bond.objective, c.bond.anchor = "jbond", "ema"
c.bond.update(beta=0.5, gamma=0.0, eta=0.02)
c.model.dtype, c.model.param_dtype = "bfloat16", "float32"
c.sampling.max_new_tokens = 32
c.optim.update(lr=1e-5, warmup_steps=0, grad_clip=1.0)
mc = presets.get("gemma3_35m", dtype=jnp.bfloat16, param_dtype=jnp.float32)
params = gemma.init_params(mc.replace(dtype=jnp.float32), jax.random.key(0))
mc = mc.replace(eos_id=-1)
w = np.random.default_rng(1).normal(size=mc.vocab_size).astype(np.float32)
reward_fn = rewards.bag_of_tokens_reward(w)
opt = steps.make_optimizer(c.optim)
tokens = np.random.default_rng(0).integers(3, 16000, (16, 16)).astype(np.int32)
batch = {"prompt_tokens": jnp.asarray(tokens), "prompt_mask": jnp.ones(tokens.shape, bool)}
step = jax.jit(steps.make_train_step(c, mc, reward_fn, opt), donate_argnums=0)
state = steps.init_state(params, opt, 0)
t0 = time.perf_counter(); state, m = step(state, batch); jax.block_until_ready(state); first = time.perf_counter() - t0
times = []
for _ in range(5):
  t0 = time.perf_counter(); state, m = step(state, batch); jax.block_until_ready(state); times.append(time.perf_counter() - t0)
print(f"{sys.argv[1] if len(sys.argv) > 1 else 'this tree'}: first {first:.1f} s, steady best {min(times)*1e3:.0f} ms, median {sorted(times)[2]*1e3:.0f} ms")
