"""Decomposition over several processes on torch.distributed (NCCL on GPUs, gloo on CPUs), launched by torchrun.

- :mod:`.layout`: how the processes share the work, ``data x cfg x sequence``; ``--parallel``'s parsing and the
  automatic choice.
- :mod:`.group`: joining the process group from torchrun's environment, the startup handshake, the groups of a
  layout, and what a failed collective becomes (:class:`~.group.RankFailure`).
- :mod:`.sequence`: Ulysses sequence parallelism, the joint sequence split over processes and an all-to-all over the
  heads around attention.
- :mod:`.cfg`: the two CFG branches on two processes, and what a process gives the pipeline to sample with.
- :mod:`.command`: ``decompose`` as one process of a parallel run (data parallel over the images, one summary).
- :mod:`.two_devices`: the two CFG branches on two GPUs of one process, without torch.distributed (for ComfyUI).
"""
