"""Where code runs: hardened Docker sandboxes (and a local, non-isolated backend) driving Jupyter kernels.

Knows nothing of agents, biology or the service.
"""
