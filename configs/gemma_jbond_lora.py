"""J-BOND (configs/gemma_jbond.py, the paper's hyperparameters) with LoRA or QLoRA, paper scale.

`--config=configs/gemma_jbond_lora.py:SIZE` with SIZE one of
  2b_v5e8    Gemma 2B,  LoRA r 16 on a bf16 base,  TPU v5e-8 (8 chips x 16 GiB HBM)
  7b_v5e8    Gemma 7B,  QLoRA r 16 on an int8 base, TPU v5e-8
  7b_v5p8    Gemma 7B,  LoRA r 16 on a bf16 base,  TPU v5p-8 (4 chips x 95 GiB HBM)

Per-chip memory arithmetic (parameters; activations with remat; B prompts x 3 samples; 512
prompt + 256 new tokens). Full fine-tuning holds six f32 copies of the model (policy, anchor,
reference, Adam m and v, gradients): 2B 2.51B x 24 B = 56 GiB, 7B 8.54B x 24 B = 191 GiB, more
than a whole v5e-8 (128 GiB). With LoRA one base is stored and only the adapters are trained:

  2b_v5e8 (mesh data 1 x fsdp 8, B = 128):
    base bf16 2.51B x 2 B = 4.67 GiB / 8 (fsdp), and a merged copy in flight   1.2 GiB
    adapters r 16 19.6M x 4 B x 5 (policy, anchor, m, v, grads), replicated  0.37 GiB
    KV cache, 384 rows x 768 x 18 layers x 2 x 1 head x 256 x bf16 = 5.4 GiB / 8   0.68 GiB
    remat residuals, 384 x 768 x 2048 x bf16 x 18 layers = 20 GiB / 8   2.5 GiB
                                                                   total ~4.8 GiB of 16
  7b_v5e8 (fsdp 8, B = 32: Gemma 7B's 16 KV heads make the cache 16x the 2B's per row):
    base: layers int8 7.75B x 1 B = 7.22 GiB, the tied embedding bf16 (not quantized by
      default, model.lora.quantize_embedding) 0.79B x 2 B = 1.46 GiB; 8.7 GiB / 8   1.1 GiB
    the merged bf16 layer weights while a pass runs, 14.4 GiB / 8   1.8 GiB
    adapters r 16 50.0M x 4 B x 5, replicated                      0.93 GiB
    KV cache, 96 rows x 768 x 28 x 2 x 16 x 256 x bf16 = 33.8 GiB / 8   4.2 GiB
    remat residuals, 96 x 768 x 3072 x bf16 x 28 = 11.8 GiB / 8     1.5 GiB
                                                                   total ~9.5 GiB of 16
  7b_v5p8 (fsdp 4, B = 128):
    base bf16 8.54B x 2 B = 15.9 GiB / 4, and a merged copy in flight   8.0 GiB
    adapters, replicated                                           0.93 GiB
    KV cache 135 GiB / 4                                            33.8 GiB
    remat residuals 47 GiB / 4                                      11.8 GiB
                                                                   total ~55 GiB of 95
Not counted: the f32 logits of the teacher-forced passes, [rows, 256, 256000] (100 GiB at 384
rows, 12.5 GiB per chip over 8): at this scale the passes must score completions without
materialising them (chunked log-probs, the fast-step issue) or run in row chunks. These are
estimates for paper-scale runs (no TPU here); the measured CPU figures of the 270M LoRA config
are in benchmarks/RESULTS.md.
"""

from configs import gemma_jbond

SIZES = {
    "2b_v5e8": dict(preset="gemma_2b", base_dtype="bfloat16", fsdp=8, batch_size=128),
    "7b_v5e8": dict(preset="gemma_7b", base_dtype="int8", fsdp=8, batch_size=32),
    "7b_v5p8": dict(preset="gemma_7b", base_dtype="bfloat16", fsdp=4, batch_size=128),
}


def get_config(size: str = "2b_v5e8"):
  if size not in SIZES:
    raise ValueError(f"configs/gemma_jbond_lora.py:SIZE must be one of {list(SIZES)}, got {size!r}")
  s = SIZES[size]
  c = gemma_jbond.get_config()
  c.model.preset = s["preset"]
  c.model.checkpoint = f"/path/to/{s['preset'].replace('_', '-')}-sft-hf"
  c.model.lora.rank = 16
  c.model.lora.alpha = 32.0
  c.model.lora.targets = "attn,mlp"
  c.model.lora.base_dtype = s["base_dtype"]
  c.mesh.fsdp = s["fsdp"]
  c.data.batch_size = s["batch_size"]
  c.optim.lr = 3e-5          # LoRA: 10x the paper's full fine-tuning lr
  return c
