"""ldm-smd: latent diffusion with Soft Mixture Denoising.

Li, van Breugel, van der Schaar, ICLR 2024 (arXiv 2309.14068).
"""

__version__ = "0.1.0"

# Sections of the config language that live outside ldm_smd.config register themselves with it
# when imported (ldm_smd.config.register_section); importing them here makes every loader of a
# config know them, while the config loader imports none of them.
from ldm_smd.bench import spec as _bench_section  # noqa: E402, F401  (the `bench:` block)
