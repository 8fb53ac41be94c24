#!/usr/bin/env bash
# The runtime kernels' loops are compiled per instruction set (AVX-512, AVX2+FMA and the
# baseline: `widest!` in runtime/src/runtime/kernels/mod.rs) and a machine runs only the widest
# it has. This runs the kernel tests (each kernel against tract's own ops) under qemu-x86_64
# emulating a Haswell (the AVX2 versions, with the `gemm` FMA micro-kernels) and a Nehalem
# (SSE4.2: the baseline versions, products through `gemm::gemm`), so every version is tested
# whatever CPU CI has.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v qemu-x86_64 >/dev/null ||
    { echo "isa-check: qemu-x86_64 is not installed (apt-get install qemu-user)" >&2; exit 1; }
for cpu in Haswell Nehalem; do
    echo "isa-check: kernel tests on an emulated $cpu" >&2
    CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="qemu-x86_64 -cpu $cpu" \
        cargo test --release --locked -p edge-runtime --lib runtime::kernels::
done
