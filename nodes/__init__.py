"""ComfyUI nodes of the pack (V3 API). The only package here that imports ComfyUI.

By family: ``loaders`` (the transformer and its fast-path mode, the RGBA-VAE, Qwen2.5-VL), ``prompt`` (Encode
Prompt, Auto-caption), ``decompose`` (Encode Image, Decompose, Decode Layers: step by step), ``pipeline`` (Image to
Layers, Split Layer: the whole pipeline in one node), ``layer_io`` (Save PSD, Save PNG zip, Load Layered PSD, Load
Image Folder), ``edit`` (Select, Replace, Transform, Recolor, Remove, Hide/Show, Reorder, Merge and Composite
Layers), ``metrics`` (Recompose PSNR); ``common`` holds what they share, ``comfy_model`` the models inside
ComfyUI's model management, ``fast_path`` how the transformer's blocks run there.
"""

from comfy_api.latest import ComfyExtension, io

from . import edit
from .decompose import DecodeLayers, Decompose, EncodeImage
from .layer_io import LoadImageFolder, LoadLayeredPSD, SaveLayerPNGs, SavePSD
from .loaders import FastPath, LoadMMDiT, LoadRGBAVAE, LoadTextEncoder
from .metrics import RecomposePSNR
from .pipeline import ImageToLayers, SplitLayer
from .prompt import Caption, TextEncode

NODES = [
    LoadImageFolder,
    ImageToLayers,
    SplitLayer,
    SaveLayerPNGs,
    LoadMMDiT,
    FastPath,
    LoadRGBAVAE,
    LoadTextEncoder,
    TextEncode,
    Caption,
    EncodeImage,
    Decompose,
    DecodeLayers,
    SavePSD,
    LoadLayeredPSD,
    *edit.NODES,
    RecomposePSNR,
]


class LayeredExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> LayeredExtension:
    return LayeredExtension()
