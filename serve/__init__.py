"""The Ray Serve application of rldiff (``serve/app.py``) and its deploy config (``config.yaml``)."""
