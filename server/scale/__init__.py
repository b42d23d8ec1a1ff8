"""Scale-out on Ray Serve: many engine replicas of one backbone, one writer for the store, and an
ingress that serves the same HTTP API as the single-process server (see ``ray_app.py``)."""
