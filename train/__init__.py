"""Trainers for aligning language models: data, models, losses, trainers, checkpoints, logging."""
