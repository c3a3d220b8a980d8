"""Models: loading, the default model, SAT tokens, adapters, shipped artifacts."""
