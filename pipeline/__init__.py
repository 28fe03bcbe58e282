"""The sweep-and-eval pipeline around the R-LoRA tuner (``rlora``)."""

__version__ = "0.2.0"
