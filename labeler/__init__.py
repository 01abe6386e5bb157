"""FAN and FAN-Hybrid models with a dense per-patch head, and FAN token-labeler (FAN-TL) training."""
