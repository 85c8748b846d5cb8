"""The data: release readers, TFDS builders, the seqio pipeline, I_tau formatting and metrics."""
