"""What every package shares, at the bottom of the layers: the user-error type and its CLI wrapper, durable files, ranks."""
