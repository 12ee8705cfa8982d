"""ComfyUI nodes of the pack (V3 API). The only package here that imports ComfyUI."""

from comfy_api.latest import ComfyExtension, io

from .nodes import NODES


class LayeredExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> LayeredExtension:
    return LayeredExtension()
