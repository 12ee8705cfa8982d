"""Qwen-Image-Layered for ComfyUI.

ComfyUI imports this folder as a custom node pack; the plain-PyTorch library is ``layered_core``
beside it. Outside ComfyUI (tests, ``pip install``) nothing here is loaded.
"""

import os
import sys

try:
    import comfy_api.latest  # noqa: F401  (present only inside ComfyUI)
except ImportError:
    comfy_entrypoint = None
else:
    # layered_core sits beside this file; a pack folder is not on sys.path by itself
    _here = os.path.dirname(os.path.abspath(__file__))
    if _here not in sys.path:
        sys.path.insert(0, _here)
    from .nodes import comfy_entrypoint  # noqa: E402,F401
