"""Model integration with the ergonomics of Hugging Face peft: ``SpftConfig``, ``get_spft_model``,
merging and unloading, adapter files. Imports ``ops``, ``nn`` and ``masks``."""
