"""Layers: drop-in ``nn.Linear`` replacements with a frozen W0 and a trainable delta, one file per
layer plus the shared base. Imports only ``ops``."""
