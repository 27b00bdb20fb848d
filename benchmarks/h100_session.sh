#!/bin/sh
# Every GPU measurement of the closing notes in one device call (H100, MLX CUDA), results
# under $OUT (default ./h100-out). Each step has its own time limit so one slow or failing
# step leaves the others' numbers. The first step also pays MLX's CUDA kernel compilation
# (up to several minutes on a fresh machine). A device call lasts at most 10 minutes, so
# split the steps over calls on the same warm machine, e.g. `dist` (two GPUs), then `tests`,
# then `bench mtp`. On a fresh machine the GPU tests alone need more than one call (420 s
# covered 62 of them in one process; `tests` now runs them in parallel shards): run `tests` first, on its
# own, and the rest on the warm machine.
#   sh benchmarks/h100_session.sh [bench|kernels|router|mtp|tests|dist|allreduce ...]
# `mtp` reads the trained fixture converted beforehand (carry .bench_data to the device):
#   mlxkt convert ../shared/fixtures/dsv3-code-tiny/bf16 .bench_data/tiny-bf16 --no-quantize
#   mlxkt convert ../shared/fixtures/dsv3-code-tiny/bf16 .bench_data/tiny-4bit
OUT=${OUT:-h100-out}
mkdir -p "$OUT"
STEPS=${*:-"bench kernels router mtp tests"}
step() {  # name, limit in s, command...
    name=$1; limit=$2; shift 2
    echo "=== $name ($(date +%T))"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "=== $name rc=$? ($(date +%T))"
    tail -n 60 "$OUT/$name.log"
}
for s in $STEPS; do
    case $s in
    bench) step bench "${BENCH_LIMIT:-400}" python3 -W ignore benchmarks/bench.py \
        --layers 8 --experts 32 --prefill 512,4096 --contexts 1024,8192,32768 --decode-tokens 32 \
        --repeats 3 --variants "${BENCH_VARIANTS:-fused-proj,no-gemv}" --max-seconds "${BENCH_SECONDS:-360}" \
        --workdir /tmp/w8 --out "$OUT/bench" ;;
    kernels) step kernels 300 python3 benchmarks/kernels.py --bits 4 --sweep \
        --json "$OUT/kernels.json" ;;
    router) step router 60 python3 benchmarks/router.py --json "$OUT/router.json" ;;
    mtp) step mtp 150 python3 benchmarks/mtp.py fixture --model .bench_data/tiny-bf16 \
        --tokens 200 --repeats 3
        step mtp-4bit 150 python3 benchmarks/mtp.py fixture --model .bench_data/tiny-4bit \
        --tokens 200 --repeats 3 ;;
    tests) # GPU test files in ${SHARDS:-4} parallel pytest processes (NVRTC compiles are
        # CPU-bound and the kernel tests compile one variant each): shard i runs every
        # SHARDS-th test; logs tests-i.log, a summary in tests.log.
        files="tests/test_loader_utils.py tests/test_cpu_heads.py tests/test_mtp.py tests/test_kernels_gpu.py tests/test_qgemv.py tests/test_router_kernel.py tests/test_decode_compile.py tests/test_expert_segments.py tests/test_distributed.py tests/test_mla_decode.py tests/test_mla_prep.py tests/test_mla_queries.py tests/test_gate_norm.py tests/test_key_padding.py tests/test_qgemv_lanes.py tests/test_generate.py tests/test_cache_buffer.py"
        python3 -m pytest --collect-only -q -p no:cacheprovider $files 2>/dev/null | grep '::' > "$OUT/tests-ids.txt"
        n=${SHARDS:-4}
        echo "=== tests: $(wc -l < "$OUT/tests-ids.txt") tests in $n shards ($(date +%T))"
        i=0
        while [ $i -lt $n ]; do
            awk -v n=$n -v i=$i 'NR % n == i' "$OUT/tests-ids.txt" > "$OUT/tests-ids-$i.txt"
            timeout "${TESTS_LIMIT:-540}" python3 -m pytest -q -p no:cacheprovider -rs \
                $(cat "$OUT/tests-ids-$i.txt") > "$OUT/tests-$i.log" 2>&1 &
            i=$((i + 1))
        done
        wait
        for f in "$OUT"/tests-[0-9]*.log; do echo "--- $f"; grep -E "passed|failed|error|FAILED|ERROR" "$f" | tail -n 15; done | tee "$OUT/tests.log"
        echo "=== tests done ($(date +%T))" ;;
    allreduce) step allreduce 120 python3 benchmarks/allreduce.py --json "$OUT/allreduce.json" ;;
    dist) step dist "${DIST_LIMIT:-560}" python3 -W ignore benchmarks/distributed.py --backend nccl \
        --synthetic 8,32 --runs "${DIST_RUNS:-single:1,experts:2,experts:2:MLX_USE_CUDA_GRAPHS=1,experts:2:MLXKT_SPLIT_ATTENTION=0}" \
        --max-tokens 32 --repeats 2 --max-seconds "$(( ${DIST_LIMIT:-560} - 20 ))" --workdir /tmp/w8 \
        --json "$OUT/dist.json" ;;
    esac
done
