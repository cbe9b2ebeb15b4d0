"""Training: the loop, engines, checkpoints, training log, audit, CUDA graphs, process launch."""
