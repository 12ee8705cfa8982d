"""Files written whole or not at all, with the permissions any new file gets."""

import os
import stat

import numpy as np
import pytest

from layered_core import atomic
from layered_core.atomic import atomic_write, atomic_write_text
from layered_core.checkpoints import save_mmdit, save_vae
from layered_core.export import save_png_zip
from layered_core.layers import Layer, LayerStack
from layered_core.psd import save_psd
from layered_core.tiny_models import tiny_transformer, tiny_vae


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"the previous version")

    def broken(file):
        file.write(b"half of it")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken)
    assert target.read_bytes() == b"the previous version"
    assert os.listdir(tmp_path) == ["out.bin"]
    atomic_write_text(target, "new ✓")
    assert target.read_text(encoding="utf-8") == "new ✓" and os.listdir(tmp_path) == ["out.bin"]


def test_a_missing_directory_is_named(tree, tmp_path):
    with pytest.raises(FileNotFoundError, match="the directory .*missing does not exist"):
        save_png_zip(tree, tmp_path / "missing" / "out.zip")
    assert not (tmp_path / "missing").exists()


def test_saved_files_get_normal_permissions(tmp_path):
    """Readable by others (a ComfyUI server running as another user), unlike mkstemp's 0600."""
    stack = LayerStack(8, 8, (Layer(np.full((8, 8, 4), 200, np.uint8), "one"),))
    transformer = tiny_transformer()
    written = [
        save_psd(stack, tmp_path / "a.psd"),
        save_png_zip(stack, tmp_path / "a.zip"),
        save_mmdit(transformer.state_dict(), tmp_path / "t.safetensors", config=transformer.config),
        save_vae(tiny_vae(), tmp_path / "v.safetensors"),
        atomic_write_text(tmp_path / "a.json", "{}"),
    ]
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~atomic._UMASK, path
        assert stat.S_IMODE(path.stat().st_mode) & 0o044, path
