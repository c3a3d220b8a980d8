"""The serving engine: requests joining and leaving batches, streaming text."""
