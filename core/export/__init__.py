"""Writing what a training run produced (LoRA files) in the formats other tools load."""
