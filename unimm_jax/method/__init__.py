"""The method (DESIGN.md sections 4-5), apart from the network: schedules, tasks (a role per segment), the
corruption / loss / ELBO object (``diffusion.py``) and the samplers (``samplers/``, one file per method)."""
