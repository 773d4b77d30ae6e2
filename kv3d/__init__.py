"""KV3D: an inference server for many concurrent chat sessions on llama.cpp and Ray Serve."""

__version__ = "0.1.0"
