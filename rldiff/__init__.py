"""rldiff: learn per-sample, per-step sampling recipes for diffusion models."""

__version__ = "0.1.0"
