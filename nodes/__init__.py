"""ComfyUI nodes of the pack (V3 API). The only package here that imports ComfyUI.

Empty for now: the nodes are built on top of ``layered_core`` once the decomposition pipeline exists.
"""
