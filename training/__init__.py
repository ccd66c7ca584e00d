"""Training of one-step person search models: datasets, transforms, trainer and evaluation."""
