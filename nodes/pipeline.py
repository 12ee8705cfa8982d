"""The nodes that run layered_core's whole pipeline in one: Image to Layers (encode, caption, sample, decode)
and Split Layer (one layer of a stack decomposed again into sub-layers)."""

from __future__ import annotations

import comfy.model_management as mm
from comfy_api.latest import io, ui

from ..layered_core.layers import parse_layer_path
from ..layered_core.pipeline import DecomposeOptions, LayeredPipeline
from .comfy_model import ComfyTransformer, ManagedVAE
from .common import (
    CATEGORY,
    PREFIX,
    STACK_TOOLTIP,
    LayerStackType,
    cfg_input,
    cfg_normalize_input,
    is_ours,
    layer_outputs,
    layers_input,
    mask_input,
    progress_reporter,
    resolution_input,
    seed_input,
    single_image,
    step_callback,
    steps_input,
    text_encoder_input,
)


def _require_pack_vae(vae, node: str) -> None:
    if not is_ours(vae):
        raise ValueError(f"{node} needs this pack's RGBA-VAE (Load RGBA-VAE)")


def _pipeline(model, vae, text_encoder) -> LayeredPipeline:
    """layered_core's pipeline on a ComfyUI MODEL (loaded to the GPU now) and this pack's VAE."""
    mm.load_models_gpu([model])
    return LayeredPipeline(ComfyTransformer(model), ManagedVAE(vae), text_encoder)


class ImageToLayers(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=f"{PREFIX}ImageToLayers",
            display_name="Image to Layers",
            category=CATEGORY,
            description="Encode, caption (if the prompt is empty), sample and decode in one node.",
            inputs=[
                io.Model.Input("model", tooltip="the VLD-MMDiT"),
                io.Vae.Input("vae", tooltip="this pack's RGBA-VAE"),
                text_encoder_input(),
                io.Image.Input("image", tooltip="RGB or RGBA"),
                io.String.Input("prompt", default="", multiline=True, tooltip="empty: English auto-caption"),
                layers_input(),
                steps_input(),
                cfg_input(),
                cfg_normalize_input(),
                resolution_input(),
                seed_input(),
                mask_input(),
            ],
            outputs=[
                *layer_outputs(),
                LayerStackType.Output(display_name="stack", tooltip=STACK_TOOLTIP),
                io.String.Output(
                    display_name="prompt",
                    tooltip="the prompt used (the caption if it was empty), also shown on the node",
                ),
            ],
        )

    @classmethod
    def execute(
        cls, model, vae, text_encoder, image, prompt, layers, steps, cfg, cfg_normalize, resolution, seed, mask=None
    ) -> io.NodeOutput:
        _require_pack_vae(vae, "Image to Layers")
        pipeline = _pipeline(model, vae, text_encoder)
        options = DecomposeOptions(
            layer_count=layers,
            steps=steps,
            cfg_scale=cfg,
            cfg_normalize=cfg_normalize,
            resolution=int(resolution),
            seed=seed,
        )
        callback = step_callback(model, steps)

        result = pipeline(
            single_image(image, "Image to Layers", mask),
            prompt,
            options,
            callback=callback,
            decode_progress=progress_reporter(),
        )
        images = result.layer_images.permute(0, 2, 3, 1)
        composite = result.composite.permute(1, 2, 0)[None]
        return io.NodeOutput(
            images, 1.0 - images[..., 3], composite, result.stack(), result.prompt, ui=ui.PreviewText(result.prompt)
        )


class SplitLayer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=f"{PREFIX}SplitLayer",
            display_name="Split Layer (recursive)",
            category=CATEGORY,
            description="Decomposes one layer of a stack again into sub-layers, kept as a tree at the layer's "
            "place (a group in the PSD). Chain it to split deeper.",
            inputs=[
                LayerStackType.Input("stack", tooltip="the layer stack from Decode Layers or another split"),
                io.Model.Input("model", tooltip="the VLD-MMDiT"),
                io.Vae.Input("vae", tooltip="this pack's RGBA-VAE"),
                text_encoder_input("for the prompt (or the auto-caption)"),
                io.String.Input("path", default="1", tooltip="1-based layer number, bottom = 1; '2/1' for a sub-layer"),
                layers_input(2, "sub-layer count"),
                io.String.Input("prompt", default="", multiline=True, tooltip="empty: auto-caption of the layer"),
                steps_input(),
                cfg_input(),
                seed_input(),
            ],
            outputs=[LayerStackType.Output(display_name="stack", tooltip=STACK_TOOLTIP)],
        )

    @classmethod
    def execute(cls, stack, model, vae, text_encoder, path, layers, prompt, steps, cfg, seed) -> io.NodeOutput:
        _require_pack_vae(vae, "Split Layer")
        index = parse_layer_path(path, stack)
        pipeline = _pipeline(model, vae, text_encoder)
        options = DecomposeOptions(steps=steps, cfg_scale=cfg, seed=seed)
        callback = step_callback(model, steps)

        split = pipeline.split(
            stack, index, layers, prompt=prompt, options=options, callback=callback, decode_progress=progress_reporter()
        )
        return io.NodeOutput(split)
