"""`python -m llmhelpers`: the notebook's steps from the command line (llmhelpers.cli)."""
import sys

from llmhelpers.cli import main

sys.exit(main())
