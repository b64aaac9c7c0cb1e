"""unimm_jax: one masked discrete-diffusion transformer over joint text and image tokens."""

__version__ = "0.1.0"
__all__ = ["Pipeline"]


def __getattr__(name):
  # Lazy, so `import unimm_jax` (and `python -m unimm_jax.main --help`) does not pay for importing JAX.
  if name == "Pipeline":
    from unimm_jax.pipeline import Pipeline  # pylint: disable=g-import-not-at-top
    return Pipeline
  raise AttributeError(f"module 'unimm_jax' has no attribute {name!r}")
