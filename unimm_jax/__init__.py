"""unimm_jax: one masked discrete-diffusion transformer over joint text and image tokens."""

__version__ = "0.1.0"
