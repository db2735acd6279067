"""REINFORCE with a KL penalty (β_RL = 0.01, RLOO over 2 samples) on the real Gemma 3 270M.

The baseline to `gemma3_270m_jbond.py`: same model, prompts, VADER reward, sizes and steps.
"""

from configs import gemma3_270m_jbond


def get_config():
  c = gemma3_270m_jbond.get_config()
  c.bond.objective = "reinforce"
  c.bond.anchor = "fixed"
  c.bond.beta_rl = 0.01
  c.bond.num_policy_samples = 2
  return c
