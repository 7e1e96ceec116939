"""bidirlm: turn causal decoder LLMs into bidirectional encoders (BidirLM recipe).

Importing the package is cheap and never touches a device: kernels and runtime modules are
imported on first use.
"""

__version__ = "0.1.0"
