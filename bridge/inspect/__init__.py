"""Inspectors: the API (api.py), the chain/manager (manager.py) and the built-ins."""
