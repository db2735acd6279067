"""Entry point: `python -m bond.main`. For now: model summary and a greedy continuation."""

from absl import app, flags
import jax
import jax.numpy as jnp

from bond.models import gemma, presets

FLAGS = flags.DEFINE_string("preset", "tiny_gemma3", "Gemma preset name (bond.models.presets).")


def main(argv):
  del argv
  config = presets.get(FLAGS.value)
  params = gemma.init_params(config, jax.random.key(0))
  n = sum(x.size for x in jax.tree.leaves(params))
  print(f"{FLAGS.value}: {n:,} params, {config.num_layers} layers, layer types {config.layer_types}")
  tokens = jnp.array([[config.bos_id, 10, 11, 12]], jnp.int32)
  model = gemma.Gemma(config)
  for _ in range(8):
    logits = model.apply({"params": params}, tokens)
    tokens = jnp.concatenate([tokens, jnp.argmax(logits[:, -1:], -1).astype(jnp.int32)], axis=1)
  print("greedy continuation (random weights):", tokens[0].tolist())


if __name__ == "__main__":
  app.run(main)
