"""Asks MLServer directly over its KServe v2 REST API (Python's standard library only), as an
application would, what each model answers for one input tensor.

Usage: python mlserver_client.py HTTP_PORT TENSOR_FILE LABELS MODEL...
TENSOR_FILE holds little-endian float32 values, its shape in TENSOR_FILE.shape. Prints one
JSON document: per model, its raw outputs (name: datatype, shape) and the labels it scored
with their scores, best first: the pairs of `classes` [N, k] and `scores` [N, k]; for
`scores` [N, C] (every class), each of `classes` scored at its own index, or without
`classes` the top 5 named by LABELS (one label per class); for a model whose name has
"logits", the same after a softmax of the full vector.
"""

import json
import sys
import urllib.request

import numpy as np

port, tensor_file, labels_file, *models = sys.argv[1:]
shape = [int(x) for x in open(tensor_file + ".shape").read().split(",")]
values = np.fromfile(tensor_file, dtype="<f4")
labels = [line.strip() for line in open(labels_file, encoding="utf-8") if line.strip()]
body = json.dumps(
    {"inputs": [{"name": "input", "datatype": "FP32", "shape": shape, "data": values.tolist()}]}
).encode()

out = {}
for model in models:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v2/models/{model}/infer",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    reply = json.load(urllib.request.urlopen(request, timeout=120))
    outputs = {o["name"]: o for o in reply["outputs"]}
    answer = {"outputs": {n: [o["datatype"], o["shape"]] for n, o in outputs.items()}}
    if "scores" in outputs:
        scores = np.array(outputs["scores"]["data"], dtype=np.float32).reshape(outputs["scores"]["shape"])[0]
        if "logits" in model:
            scores = np.exp(scores - scores.max())
            scores = scores / scores.sum()
        classes = outputs.get("classes")
        if classes is None:
            top = np.argsort(-scores, kind="stable")[:5]
            pairs = [[labels[i], float(scores[i])] for i in top]
        else:
            names = np.array(classes["data"], dtype=object).reshape(classes["shape"])[0]
            if len(names) == len(scores):
                pairs = [[str(c), float(s)] for c, s in zip(names, scores)]
            else:
                pairs = [[str(c), float(scores[labels.index(str(c))])] for c in names]
        answer["pairs"] = sorted(pairs, key=lambda p: -p[1])
    out[model] = answer
print(json.dumps(out))
