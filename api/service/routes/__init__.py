"""Routers: parse, call api/userops.py, shape the answer. Nothing else happens here."""
