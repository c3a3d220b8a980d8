"""Training: rows, losses, data."""
