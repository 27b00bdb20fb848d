"""Turn one job's source rows into output bytes: decode (FP8 blocks, bf16, ...), cast to the
output dtype, quantize (MLX affine) and hand the pieces to the writer, a row chunk at a time.

Numerics follow mlx-lm's own conversion so the results match it: FP8 is dequantized in
float32 and rounded to the output dtype before quantizing; kv_b_proj is split after the cast.
"""

import itertools
from typing import Callable

import mlx.core as mx
import numpy as np

from mlxkt.layers.kv_b import split_kv_b

from .fp8 import dequant_rows_mx
from .pipeline import WriteBehind, prefetch
from .plan import Job
from .source import ITEMSIZE, Reader, TensorInfo

# Source elements per chunk: bounds the working set (~16 bytes per element at peak).
CHUNK_ELEMS = 8 * 2**20
MX_DTYPES = {"BF16": mx.bfloat16, "F16": mx.float16, "F32": mx.float32}

Write = Callable[[str, int, object], None]  # (tensor name, first row, buffer)


def float32_np(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)


class Transformer:
    def __init__(self, reader: Reader, block=(128, 128)):
        self.reader, self.block = reader, tuple(block)

    def chunk_rows(self, t: TensorInfo) -> int:
        rows = max(1, CHUNK_ELEMS // max(t.cols, 1))
        if t.dtype == "F8_E4M3":
            rows = max(self.block[0], rows // self.block[0] * self.block[0])
        return rows

    def chunks(self, job: Job):
        """(job, r0, r1) row ranges of a job; kv_b is split whole."""
        t = job.src
        step = t.rows if job.kind == "kv_b" else self.chunk_rows(t)
        return [(job, r0, min(t.rows, r0 + step)) for r0 in range(0, t.rows, step)]

    def read(self, job: Job, r0: int, r1: int):
        """Disk work for one chunk (runs in the read-ahead thread): raw rows and the scales."""
        scale = None
        if job.scale is not None:
            scale = float32_np(self.reader.rows(job.scale), job.scale.dtype)
        return job, r0, r1, self.reader.rows(job.src, r0, r1), scale

    def load(self, job: Job, r0: int, raw: np.ndarray, scale) -> mx.array:
        """Raw source rows starting at r0 as an mx array in the output dtype."""
        t, out = job.src, MX_DTYPES[job.dtype]
        if t.dtype == "F8_E4M3":
            x = dequant_rows_mx(raw, scale, r0, self.block)
        elif t.dtype == "BF16":
            x = mx.array(raw).view(mx.bfloat16)
        else:
            x = mx.array(raw)
        return x.astype(out)

    def run_all(self, jobs, write: Write, progress: Callable[[int], None] = lambda n: None,
                on_job: Callable[[], None] = lambda: None):
        """All jobs in order, reading ahead and writing behind the compute."""
        items = (c for job in jobs for c in self.chunks(job))
        stream = prefetch(items, self.read)
        writer = WriteBehind(write)
        try:
            for _, group in itertools.groupby(stream, key=lambda c: id(c[0])):
                first = next(group)
                self.run(first[0], itertools.chain([first], group), writer, progress)
                on_job()
        finally:
            stream.close()
            writer.close()

    def run(self, job: Job, chunks, write: Write, progress: Callable[[int], None]):
        """One job from its chunks [(job, r0, r1, raw, scale)]."""
        t = job.src
        for _, r0, r1, raw, scale in chunks:
            x = self.load(job, r0, raw, scale)
            if job.kind == "kv_b":
                self.run_kv_b(job, x, write)
            elif job.module:
                emit_module(job.out, x, job.quant, job.row0 + r0, write)
            else:
                mx.eval(x)
                write(job.out, job.row0 + r0, x)
            progress((r1 - r0) * t.cols * ITEMSIZE[t.dtype])

    def run_kv_b(self, job: Job, w: mx.array, write: Write):
        # w: [H*(nope+v), r]
        H, nope = job.heads
        embed_q, unembed_out = split_kv_b(w, H, nope)  # [H, r, nope], [H, v, r]
        emit_module(job.out + "embed_q", embed_q, job.quant[0], 0, write)
        emit_module(job.out + "unembed_out", unembed_out, job.quant[1], 0, write)


def emit_module(module: str, x: mx.array, quant, row0: int, write: Write):
    """x: [..., in] logical weight rows of `module`; writes .weight (+ .scales/.biases)."""
    if quant is None:
        x = mx.contiguous(x)
        mx.eval(x)
        write(f"{module}.weight", row0, x)
        return
    w, s, b = mx.quantize(x, group_size=quant["group_size"], bits=quant["bits"])
    mx.eval(w, s, b)
    write(f"{module}.weight", row0, w)
    write(f"{module}.scales", row0, s)
    write(f"{module}.biases", row0, b)
