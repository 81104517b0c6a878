"""Data: raw sources, prepared datasets and their splits, content features (encoders, feature cache), model inputs."""
