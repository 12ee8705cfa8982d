"""Qwen-Image-Layered for ComfyUI.

ComfyUI imports this folder as a custom node pack (a package named after the folder); the nodes reach the
plain-PyTorch library ``layered_core`` beside them through that package, so nothing here goes on sys.path
and another module called ``layered_core`` cannot collide with it. Outside ComfyUI (tests, ``pip install``)
nothing here is loaded.
"""

# The browser side: the JS extension that shows a node's text results (the auto-caption) on the node.
WEB_DIRECTORY = "./nodes/web"

try:
    import comfy_api.latest  # noqa: F401  (present only inside ComfyUI)
except ImportError:
    comfy_entrypoint = None
else:
    from .nodes import comfy_entrypoint  # noqa: F401
