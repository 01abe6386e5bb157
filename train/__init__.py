"""Student training from offline token labels: label-aware data path, losses, mixing, TL-Align, evaluation."""
