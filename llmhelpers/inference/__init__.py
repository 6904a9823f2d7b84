"""Generation: the continuous-batching engine, `model.generate`, tool use and the code sandbox."""
