"""The prompt nodes on this pack's Qwen2.5-VL: Encode Prompt (CONDITIONING) and Auto-caption (a STRING)."""

from __future__ import annotations

from comfy_api.latest import io, ui

from .common import CATEGORY, PREFIX, single_image, text_encoder_input


class TextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=f"{PREFIX}TextEncode",
            display_name="Encode Prompt (Qwen-Image-Layered)",
            category=CATEGORY,
            description="The reference chat template, its 34 template tokens dropped: CONDITIONING for Decompose.",
            inputs=[
                text_encoder_input(),
                io.String.Input("prompt", multiline=True, default="", tooltip="describe the whole image"),
            ],
            outputs=[io.Conditioning.Output(tooltip="the prompt embeddings, for Decompose's positive or negative")],
        )

    @classmethod
    def execute(cls, text_encoder, prompt) -> io.NodeOutput:
        embeddings, mask = text_encoder.encode([prompt], max_sequence_length=512, truncate=True)
        extra = {} if bool(mask.all()) else {"attention_mask": mask.cpu()}
        return io.NodeOutput([[embeddings.float().cpu(), extra]])


class Caption(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=f"{PREFIX}Caption",
            display_name="Auto-caption (Qwen2.5-VL)",
            category=CATEGORY,
            description="The reference auto-caption of an image (greedy), as a STRING prompt.",
            inputs=[
                text_encoder_input(),
                io.Image.Input("image", tooltip="caption the bucket-resized image, as the reference does"),
                io.Combo.Input("language", options=["en", "zh"], default="en", tooltip="annotator instruction"),
                io.Int.Input("max_new_tokens", default=512, min=1, max=2048, tooltip="caption length limit"),
            ],
            outputs=[
                io.String.Output(
                    display_name="caption", tooltip="the caption text, also shown on the node; connect to Encode Prompt"
                )
            ],
        )

    @classmethod
    def execute(cls, text_encoder, image, language, max_new_tokens) -> io.NodeOutput:
        pil = single_image(image, "Auto-caption")
        caption = text_encoder.caption(pil, language=language, max_new_tokens=max_new_tokens)
        return io.NodeOutput(caption, ui=ui.PreviewText(caption))
