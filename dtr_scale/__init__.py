"""dtr-scale: latent diffusion transformers with Denoising Task Routing, at cluster scale."""

__version__ = "0.1.0"
