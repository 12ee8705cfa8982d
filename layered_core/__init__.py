"""Qwen-Image-Layered in plain PyTorch: the VLD-MMDiT, the RGBA-VAE, their checkpoint loaders,
and the layer-stack tools. Imports nothing from ComfyUI."""

__version__ = "0.1.0"
