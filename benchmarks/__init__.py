"""The benchmarks: scripts run from the repository root as ``python -m benchmarks.<script> ...``.

``workloads`` holds what they run (random full-size models, one step's inputs, diffusers' reference) and
``measure`` how they time it (synchronised wall time, peak memory, CUDA kernel time by group). Nothing is
imported here: ``comfy_gpu_run`` must start without torch.
"""
