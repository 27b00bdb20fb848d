"""CPU emulation of the GPU kernels, for tests on machines without a GPU.

The kernel body is compiled as C++ with kt_cpu.h (one std::thread per GPU thread, blocks in
turn) and called like an mx.fast kernel object, so the tests run the exact indexing of the
Metal and CUDA kernels. Needs a C++20 compiler (`g++`); slow, for small shapes only.
"""

import ctypes
import hashlib
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import sources

C_TYPES = {mx.float32: "float", mx.float16: "float", mx.bfloat16: "float",
           mx.int32: "int32_t", mx.uint32: "uint32_t"}
NP_TYPES = {"float": np.float32, "int32_t": np.int32, "uint32_t": np.uint32,
            "uint16_t": np.uint16}

# One std::thread per GPU thread of a block; the threads walk the blocks together, with a
# barrier between blocks (every kernel barrier comes before any early return).
LAUNCH = """
#include <memory>
#include <thread>
#include <vector>
extern "C" void kt_launch(void** b, int gx, int gy, int tpb) {
  std::barrier<> block(tpb);
  kt_emu::block_barrier = &block;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  for (int w = 0; w < tpb / 32; ++w) {
    warps.emplace_back(new std::barrier<>(32));
    kt_emu::warp_barrier[w] = warps.back().get();
  }
  std::vector<std::thread> threads;
  for (int t = 0; t < tpb; ++t) {
    threads.emplace_back([=, &block] {
      kt_emu::tid = t;
      for (int by = 0; by < gy; ++by) {
        for (int bx = 0; bx < gx; ++bx) {
          kt_kernel(%s, t, bx, by);
          block.arrive_and_wait();
        }
      }
    });
  }
  for (auto& th : threads) th.join();
}
"""


def available() -> bool:
    return shutil.which("g++") is not None


@lru_cache(maxsize=None)
def _compile(code: str):
    out = Path(tempfile.gettempdir()) / "mlxkt-emu"
    out.mkdir(exist_ok=True)
    stem = hashlib.sha1(code.encode()).hexdigest()[:16]
    cpp, lib = out / f"{stem}.cpp", out / f"{stem}.so"
    if not lib.exists():
        cpp.write_text(code)
        cmd = ["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", str(cpp), "-o", str(lib)]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    return ctypes.CDLL(str(lib))


class EmulatedKernel:
    """Callable like mx.fast.cuda_kernel(...)'s result."""

    def __init__(self, spec: sources.KernelSpec):
        self.spec = spec

    def _code(self, in_types, out_types, template):
        params = [f"const {t}* {n}" for n, t in zip(self.spec.inputs, in_types)]
        params += [f"{t}* {n}" for n, t in zip(self.spec.outputs, out_types)]
        consts = []
        for name, v in template:
            if isinstance(v, mx.Dtype):
                consts.append(f"  using {name} = {C_TYPES[v]};")
            elif isinstance(v, bool):
                consts.append(f"  constexpr bool {name} = {str(v).lower()};")
            else:
                consts.append(f"  constexpr int {name} = {v};")
        args = [f"({t}*)b[{i}]" for i, t in enumerate(list(in_types) + list(out_types))]
        return (
            sources.header("cpu")
            + "\nstatic void kt_kernel(" + ", ".join(params) + ", int kt_tid, int kt_bx, int kt_by) {\n"
            + "\n".join(consts) + "\n" + sources.source("cpu", self.spec) + "\n}\n"
            + LAUNCH % ", ".join(args)
        )

    def __call__(self, *, inputs, template, grid, threadgroup, output_shapes, output_dtypes,
                 **unused):
        in_types = [C_TYPES[a.dtype] for a in inputs]
        # Inputs a kernel unpacks itself as 16-bit floats (spec.raw16) get their raw bits.
        values = dict(template)
        raw = {name for key, name in self.spec.raw16 if values.get(key, 0) > 0}
        in_types = ["uint16_t" if n in raw and a.dtype in (mx.float16, mx.bfloat16) else t
                    for n, a, t in zip(self.spec.inputs, inputs, in_types)]
        out_types = [C_TYPES[d] for d in output_dtypes]
        lib = _compile(self._code(in_types, out_types, template))
        ins = [np.ascontiguousarray(np.array(
            a.astype(mx.float32) if t == "float" else a.view(mx.uint16) if t == "uint16_t" else a),
            dtype=NP_TYPES[t]) for a, t in zip(inputs, in_types)]
        # Poison the outputs so that unwritten elements show.
        outs = [np.full(s, np.nan if t == "float" else -7, dtype=NP_TYPES[t])
                for s, t in zip(output_shapes, out_types)]
        ptrs = (ctypes.c_void_p * (len(ins) + len(outs)))(*[a.ctypes.data for a in ins + outs])
        tpb = threadgroup[0]
        gx, gy = -(-grid[0] // tpb), grid[1]
        lib.kt_launch(ptrs, gx, gy, tpb)
        return [mx.array(o).astype(d) for o, d in zip(outs, output_dtypes)]
