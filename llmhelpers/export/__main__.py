"""`python -m llmhelpers.export`: merged model folder → GGUF, read back and checked, with an Ollama Modelfile."""
import sys

from llmhelpers.export.gguf import main

sys.exit(main())
