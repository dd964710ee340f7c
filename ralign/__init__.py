"""ralign: recursive self-alignment of language models from declarative recipes."""

__version__ = "0.1.0"
