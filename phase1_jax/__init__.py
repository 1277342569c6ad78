"""phase1-jax: ResNet-BK and the Phase 1 Efficiency Engine in JAX/Flax."""

__version__ = "0.1.0"
