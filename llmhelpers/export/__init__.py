"""Leaving the notebook: GGUF for llama.cpp / Ollama, the model card, the Hub."""
