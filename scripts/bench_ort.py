"""ONNX Runtime side of `edge-bench`: one session, driven over stdin/stdout.

Usage: bench_ort.py MODEL.onnx THREADS
Reads commands, one per line, and answers each with one JSON line on stdout:
  run N     -> {"ms": [N per-inference wall times in milliseconds]}
  quit
The input is a fixed pseudo-random tensor of the model's input shape (batch 1). The session
uses THREADS intra-op threads and 1 inter-op thread, every graph optimisation, and the
default thread spinning, as a user of ONNX Runtime would run it.
"""

import json
import sys
import time

import numpy as np
import onnxruntime as ort


def main() -> None:
    model, threads = sys.argv[1], int(sys.argv[2])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    meta = session.get_inputs()[0]
    shape = [1 if not isinstance(d, int) else d for d in meta.shape]
    x = np.random.default_rng(7).uniform(-1, 1, size=shape).astype(np.float32)
    feed = {meta.name: x}
    session.run(None, feed)  # warm-up
    print(json.dumps({"ready": True, "version": ort.__version__, "shape": shape}), flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        if words[0] == "run":
            times = []
            for _ in range(int(words[1])):
                start = time.perf_counter()
                session.run(None, feed)
                times.append((time.perf_counter() - start) * 1e3)
            print(json.dumps({"ms": times}), flush=True)


if __name__ == "__main__":
    main()
