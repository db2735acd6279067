"""J-BOND with LoRA on the exact toy harness: configs/toy_jbond.py with a frozen base.

Rank 5 on the embedding (the toy vocabulary has 5 tokens: full rank) and on every attention and
MLP projection; the anchor is an EMA of the factors (bond/lora.py). The toy Gemma scales its
logits by 0.05 in the final norm, so its projections barely move the policy: without the
embedding target the policy stays at π_ref (effective N ≈ 1 after 180 steps); with it, and a
2.5x larger learning rate than full fine-tuning, J-BOND passes Best-of-4 on average over seeds
(N* 2.5-8.1 over seeds 0-7, mean 4.6: docs/toy_results.md).
"""

from configs import toy_jbond


def get_config():
  c = toy_jbond.get_config()
  c.model.lora.rank = 5
  c.model.lora.alpha = 10.0
  c.model.lora.targets = "embed,attn,mlp"
  c.optim.lr = 5e-3
  return c
