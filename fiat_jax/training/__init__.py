"""Training: the train state and step, the loop, optimizer, losses, batches, checkpoints, plans."""
