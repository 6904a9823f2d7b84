"""From source rows to training examples: reading MathCodeInstruct and SciBench, the R1 chat format, tokenizing."""
