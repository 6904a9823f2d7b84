"""Answer accuracy: grading one answer, the evaluation protocol and its tables."""
