"""Dataset tooling: ImageFolder -> WebDataset shards, the built-in demo set, and the shared reader."""
