"""Token labelers: FAN and FAN-Hybrid models with a dense per-patch head (STL's FAN-TL), the demo CNN, any timm
classifier applied at every position (labeler.dense), and their training.

`import labeler` registers the FAN models and the demo CNN with timm, as timm registers its own.
"""

from labeler import cnn, fan  # noqa: F401
