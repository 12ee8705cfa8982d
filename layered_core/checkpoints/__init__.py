"""Checkpoint files, in every layout users hold: reading, telling what a file is, writing.

- :mod:`.files`: safetensors files, shards and diffusers folders; format detection; atomic writes.
- :mod:`.transformer`: the VLD-MMDiT (diffusers folder, ComfyUI bf16 and fp8 single files).
- :mod:`.vae`: the RGBA-VAE (ComfyUI's Wan-named single file, the diffusers folder), with the key conversion.

Only safetensors are read, through memory maps: tensors are views of the page cache until a dtype change
copies them, so a 41 GB file is never held twice in RAM. Every problem raises :class:`CheckpointError`
naming the file.
"""

from .files import CheckpointError, describe_keys, open_checkpoint, read_safetensors_header
from .quantized import quantized_layers
from .transformer import infer_mmdit_config, load_mmdit, open_transformer, save_mmdit
from .vae import load_vae, save_vae

__all__ = [
    "CheckpointError",
    "describe_keys",
    "infer_mmdit_config",
    "load_mmdit",
    "load_vae",
    "open_checkpoint",
    "open_transformer",
    "quantized_layers",
    "read_safetensors_header",
    "save_mmdit",
    "save_vae",
]
