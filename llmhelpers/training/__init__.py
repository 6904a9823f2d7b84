"""Training: the trainer and its resume, checkpoint files, the run lock, packed rows, memory, the runs index."""
