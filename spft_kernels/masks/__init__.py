"""Choosing what trains: target discovery, salience scores, top-k selection, row importance, dynamic
masks. Imports ``ops`` and ``nn``."""
