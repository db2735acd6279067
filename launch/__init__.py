"""Launchers for bond: `python -m launch.tpu_vm` (Cloud TPU VMs and pods)."""
