"""Measurement tooling: the benchmark driver and its workloads, the side-by-side server
comparison, the routing-policy comparison and the codec fidelity measurement. Drives servers
over HTTP (and, for `routers`, deploys the Serve application); nothing below imports it."""
