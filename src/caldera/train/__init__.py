"""Training: the loop (trainer.py), callbacks, metrics, losses, run-directory output and config runs."""
