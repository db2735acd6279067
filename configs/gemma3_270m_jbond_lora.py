"""J-BOND on the real Gemma 3 270M with LoRA: configs/gemma3_270m_jbond.py with one frozen base.

Rank 8 adapters (alpha 16) on every attention and MLP projection (q, k, v, o, gate, up, down of
the 18 layers: 1.9M trained parameters, 0.7% of 268M); the base is loaded and stored once in
bf16 (`model.param_dtype`) and is also the reference π_ref; the anchor is an EMA of the adapters' factors (bond/lora.py). The
learning rate is 10x the full fine-tuning config's, as usual for LoRA. Peak memory and step time
against full fine-tuning: `benchmarks/lora_memory.py` (benchmarks/RESULTS.md).

  python -m bond.main --config=configs/gemma3_270m_jbond_lora.py --workdir=/tmp/g270_lora
  python -m bond.main --config=configs/gemma3_270m_jbond_lora.py --workdir=/tmp/g270_qlora \\
      --config.model.lora.base_dtype=int8          # QLoRA: an int8 base
"""

from configs import gemma3_270m_jbond


def get_config():
  c = gemma3_270m_jbond.get_config()
  c.model.lora.rank = 8
  c.model.lora.alpha = 16.0
  c.model.lora.targets = "attn,mlp"
  c.model.param_dtype = "bfloat16"     # with LoRA: the frozen base (adapters are always f32)
  c.optim.lr = 1e-4
  return c
