"""Serving the learned policy over HTTP with Ray Serve.

``schemas`` (requests, responses, limits), ``auth`` (API key), ``catalog`` (model and policies,
hot swap, degradation), ``engine`` (requests through the one sampler), ``explain``, ``metrics`` and
``app`` (the Serve deployments and ``build_app``). All but ``app`` and ``metrics`` work without Ray.
"""
