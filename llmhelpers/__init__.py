"""Helpers behind LLM.ipynb: config, data, chat rendering, training, evaluation."""
__version__ = "0.1.0"
