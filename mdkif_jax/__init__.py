"""mdkif_jax: medical domain knowledge injection into a frozen LLM (SA-MDKIF in JAX)."""

__version__ = "0.1.0"
