"""Between a folder of clips and a training step: discovery, probing, decoding, frame selection,
bucketing, caches, augmentation and the dataset doctor. See docs/data-pipeline.md."""
