"""bond: Best-of-N alignment (BOND, J-BOND, BoNBoN) for Gemma-style models in JAX/Flax."""

__version__ = "0.1.0"
