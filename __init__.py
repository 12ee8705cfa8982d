"""Qwen-Image-Layered for ComfyUI.

ComfyUI imports this folder as a custom node pack. The plain-PyTorch library is ``layered_core``;
the ComfyUI nodes will live in ``nodes/`` and are registered here once they exist.
"""
