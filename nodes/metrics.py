"""How faithful a decomposition is, on the node beside its layers: Recompose PSNR."""

from __future__ import annotations

from comfy_api.latest import io, ui

from ..layered_core.image import resize_rgba
from ..layered_core.metrics import fidelity
from .common import CATEGORY, PREFIX, LayerStackType, single_image


class RecomposePSNR(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=f"{PREFIX}RecomposePSNR",
            display_name="Recompose PSNR",
            category=CATEGORY,
            description="How faithfully the layers add back up to the image that was decomposed: the PSNR of "
            "their composite against it (premultiplied colour, so colour under transparent pixels does not "
            "count), shown on the node.",
            inputs=[
                io.Image.Input("image", tooltip="the image that was decomposed; resized to the layers' canvas"),
                LayerStackType.Input("stack", tooltip="the layers, from Decode Layers, Image to Layers or Split Layer"),
                io.Mask.Input(
                    "mask",
                    optional=True,
                    tooltip="the image's transparency, 1 = transparent (LoadImage's MASK); none: the image's own alpha",
                ),
            ],
            outputs=[
                io.Float.Output(
                    display_name="psnr", tooltip="dB; higher is more faithful, inf when the composite is the image"
                )
            ],
            is_output_node=True,  # it shows its figure on the node, so it runs without a node after it
        )

    @classmethod
    def execute(cls, image, stack, mask=None) -> io.NodeOutput:
        picture = single_image(image, "Recompose PSNR", mask)
        resized = ""
        if picture.size != stack.size:
            resized = f" (the image resized from {picture.width}x{picture.height})"
            picture = resize_rgba(picture, stack.size)
        result = fidelity(stack, picture)
        text = (
            f"recompose PSNR {result.psnr:.2f} dB, largest error {result.max_error * 255:.0f}/255, "
            f"at {stack.width}x{stack.height}{resized}"
        )
        return io.NodeOutput(result.psnr, ui=ui.PreviewText(text))
