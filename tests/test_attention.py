"""The attention function and its kernel choice (SDPA, or FlashAttention-4 where installed)."""

from __future__ import annotations

import math
import os

import pytest
import torch

from layered_core import attention as attn


def reference(q, k, v, mask=None):
    """Softmax attention in float64 on (B, S, H, D) tensors; returns (B, S, H * D)."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    out = scores.softmax(-1) @ v
    return out.transpose(1, 2).flatten(2)


def qkv(batch=2, seq=37, heads=3, dim=16, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(batch, seq, heads, dim, generator=gen, device=device).to(dtype) for _ in range(3)]


@pytest.fixture
def backend():
    previous = attn.attention_backend()
    yield
    attn._backend = previous


def test_sdpa_matches_softmax_attention(backend):
    attn.set_attention_backend("sdpa")
    q, k, v = qkv()
    out = attn.attention(q, k, v)
    assert out.shape == (2, 37, 3 * 16)
    torch.testing.assert_close(out.double(), reference(q, k, v), rtol=1e-5, atol=1e-5)


def test_masked_keys_get_no_weight(backend):
    q, k, v = qkv(seed=1)
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[1, :5] = False  # padding at the front of the second sample, as batched guidance pads text
    out = attn.attention(q, k, v, mask)
    torch.testing.assert_close(out.double(), reference(q, k, v, mask), rtol=1e-5, atol=1e-5)
    # changing masked keys and values changes nothing
    k2, v2 = k.clone(), v.clone()
    k2[1, :5], v2[1, :5] = 100.0, -100.0
    torch.testing.assert_close(attn.attention(q, k2, v2, mask), out)


def test_auto_on_cpu_is_sdpa(backend):
    attn.set_attention_backend("auto")
    q, k, v = qkv(seed=2)
    assert attn.flash4_problem(q, None) is not None
    torch.testing.assert_close(attn.attention(q, k, v).double(), reference(q, k, v), rtol=1e-5, atol=1e-5)


def test_unknown_backend_is_refused(backend):
    with pytest.raises(ValueError, match="auto, sdpa, flash4"):
        attn.set_attention_backend("xformers")


@pytest.mark.skipif(attn.flash4_installed(), reason="FlashAttention-4 is installed here")
def test_flash4_without_the_package_names_it(backend):
    with pytest.raises(ValueError, match="pip install flash-attn-4"):
        attn.set_attention_backend("flash4")


def test_flash4_problems_are_named(monkeypatch, backend):
    monkeypatch.setattr(attn, "FLASH4_INSTALLED", True)
    q, k, v = qkv()
    assert "NVIDIA GPUs" in attn.flash4_problem(q, None)
    attn.set_attention_backend("flash4")
    # asked for by name, it refuses a call it cannot run rather than running something else
    with pytest.raises(ValueError, match="cannot run this call"):
        attn.attention(q, k, v)


needs_flash4 = pytest.mark.skipif(
    not (torch.cuda.is_available() and attn.flash4_installed() and torch.cuda.get_device_capability()[0] in (9, 10)),
    reason="needs FlashAttention-4 and a Hopper or Blackwell GPU",
)


@needs_flash4
@pytest.mark.parametrize("dim", [128, 64])  # 128: the 128 x 192 tile on Hopper; 64: FA4's own tile
def test_flash4_matches_sdpa_on_gpu(backend, dim):
    # 1000 tokens: the last key tile is partial
    q, k, v = qkv(batch=2, seq=1000, heads=4, dim=dim, dtype=torch.bfloat16, device="cuda", seed=3)
    attn.set_attention_backend("sdpa")
    expected = reference(q, k, v)
    sdpa = attn.attention(q, k, v)
    attn.set_attention_backend("flash4")
    flash = attn.attention(q, k, v)
    sdpa_error = ((sdpa.double() - expected).norm() / expected.norm()).item()
    flash_error = ((flash.double() - expected).norm() / expected.norm()).item()
    assert flash_error < 1e-2 and flash_error < 2 * sdpa_error + 1e-3, (flash_error, sdpa_error)


@needs_flash4
def test_flash4_inside_torch_compile(backend):
    attn.set_attention_backend("auto")
    q, k, v = qkv(batch=1, seq=512, heads=2, dim=128, dtype=torch.bfloat16, device="cuda", seed=4)

    def block(q, k, v):
        return attn.attention(q * 2, k, v) + 1

    compiled = torch.compile(block, fullgraph=True)  # fullgraph: the op must not break the graph
    torch.testing.assert_close(compiled(q, k, v), block(q, k, v), rtol=2e-2, atol=2e-2)


def test_flash4_disk_cache_switch(monkeypatch, tmp_path):
    for name in ("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"):
        monkeypatch.setenv(name, "")  # set first, so that monkeypatch restores the variable (or its absence) after
        monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    attn._enable_flash4_disk_cache()
    folder = tmp_path / "cache" / "qwen-layered" / "flash-attention-cute"
    assert folder.is_dir()
    assert os.environ["FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"] == "1"
    assert os.environ["FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"] == str(folder)

    # the user's own choice stands
    monkeypatch.setenv("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "0")
    monkeypatch.setenv("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR", "/somewhere/else")
    attn._enable_flash4_disk_cache()
    assert os.environ["FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"] == "0"
    assert os.environ["FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"] == "/somewhere/else"

    # no folder can be made there (a file is in the way): the cache stays off
    monkeypatch.delenv("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED")
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR", str(blocker / "sub"))
    attn._enable_flash4_disk_cache()
    assert "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED" not in os.environ
