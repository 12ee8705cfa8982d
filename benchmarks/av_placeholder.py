"""A stand-in for PyAV in benchmark processes on a machine where it is not installed.

ComfyUI's node API imports PyAV at module level for its video types, so without it no node pack loads. The GPU
benchmarks never read or write video, and PyAV's wheel (with its FFmpeg libraries) is most of what a call to the
GPU machine may carry. :func:`install` makes ``import av`` and ``from av.x.y import Name`` succeed with inert
placeholders; anything that calls into them raises, naming PyAV. It does nothing where PyAV is installed, and
nothing outside the benchmarks uses it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import logging
import sys
import types

logger = logging.getLogger(__name__)


class _MissingType(type):
    """Names under a placeholder name (``av.error.FFmpegError``) are placeholders too."""

    def __getattr__(cls, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _MissingType(name, (_Missing,), {})


class _Missing(Exception, metaclass=_MissingType):
    """Any name taken from the placeholder: a class that refuses to be used."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError("PyAV is not installed in this benchmark process (benchmarks.av_placeholder)")

    def __class_getitem__(cls, item):
        return cls


class _Module(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _MissingType(name, (_Missing,), {})


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "av" or fullname.startswith("av."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _Module(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def install() -> bool:
    """Put the placeholder in where PyAV cannot be imported; True where it did."""
    if importlib.util.find_spec("av") is not None:
        return False
    sys.meta_path.append(_Finder())
    logger.warning("PyAV is not installed: a placeholder stands in for it (no video in this process)")
    return True
