"""Samplers by registry: the one loop (``loop.py``) and one file per method, each registering itself."""

from unimm_jax.method.samplers import ancestral, confidence, threshold  # noqa: F401  (registration)
from unimm_jax.method.samplers.loop import (CACHES, CachedNetwork, SamplerConfig, Step, draw,  # noqa: F401
                                            guided_log_probs, register_sampler, registered, remaining_masked, reveal_all_but,
                                            sample, sample_with_steps, sample_with_trace)
