"""Training: one loop that runs alone or inside Ray Train's TorchTrainer."""
