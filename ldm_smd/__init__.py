"""ldm-smd: latent diffusion with Soft Mixture Denoising.

Li, van Breugel, van der Schaar, ICLR 2024 (arXiv 2309.14068).
"""

__version__ = "0.1.0"
