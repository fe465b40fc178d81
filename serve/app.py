"""The Ray Serve application: ``serve run serve.app:build_app model=... policy=...``.

The deployments live in ``rldiff.serving.app`` so that Ray's workers, the installed ``rldiff serve``
command and ``serve deploy`` all import them from the installed package; this module is the entry
point named in ``serve/config.yaml`` and in the docs (``docs/serving.md``).
"""

from rldiff.serving.app import AppArgs, Ingress, Sampler, build_app

__all__ = ["AppArgs", "Ingress", "Sampler", "build_app"]
