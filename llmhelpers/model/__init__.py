"""The model: tokenizer and 4-bit base, LoRA, the smoke profile's tiny model, merging, attention maps."""
