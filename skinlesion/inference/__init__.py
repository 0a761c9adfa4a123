"""From a checkpoint to probabilities: the loaded model, test-time augmentation, ensembles, split prediction."""
