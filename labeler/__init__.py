"""FAN and FAN-Hybrid models with a dense per-patch head, and FAN token-labeler (FAN-TL) training.

`import labeler` registers the FAN models with timm, as timm registers its own.
"""

from labeler import fan  # noqa: F401
