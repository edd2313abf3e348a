"""lasp: sequence-parallel training of linear-attention and hybrid language models.

- `lasp.kernels`: single-device chunkwise linear attention (Triton + pure-torch oracle).
- `lasp.parallel`: sequence layouts and LASP-2 / LASP-2H / LASP-1 across a process group.
"""

__version__ = "0.1.0"
