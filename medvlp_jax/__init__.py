"""medvlp_jax: medical vision-language pretraining in JAX/Flax."""
__version__ = "0.1.0"
