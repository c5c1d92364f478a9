"""Training: a prepared experiment, one fold's training loop and checkpoints, the k-fold run,
and the TTA predictions of a trained experiment."""
