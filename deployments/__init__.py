"""Ray Serve wiring for KV3D: ingress, model replicas and the application builder.

Only this package imports `ray.serve`; the classes here are plain and get their Serve
decorators in `app.py`, where the application is assembled.
"""
