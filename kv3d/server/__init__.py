"""The serving layer: the OpenAI-compatible HTTP API (FastAPI), its schemas, guard, metrics and
dashboard, chat templating, and the replica routing policy. Builds on `kv3d.engine`; knows
nothing of Ray (the Serve wiring lives in `deployments/`)."""
