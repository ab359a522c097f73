"""Operating the relay: configuration, metrics, logs and worker processes."""
