"""NVIDIA's tritonclient (KServe v2 gRPC) against a pool server.

Usage: python triton_client.py [--ca CA.pem] [--tensor TENSOR_FILE] HOST:PORT MODEL IMAGE...
Prints one JSON document: server readiness, model metadata, and ModelInfer answers for the
images sent as a BYTES tensor (classes and scores, top 5). With --ca the connection is TLS,
the server's certificate checked against CA.pem and HOST (as from a laptop through the
cluster's ingress: tests/e2e/ingress.rs). With --tensor, also the answers for the float
tensor in TENSOR_FILE (little-endian float32, its shape in TENSOR_FILE.shape) sent as FP32
`input`: `scores` of every class, then with top_k 5 the top labels (`classes`, `scores`).
"""

import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient

args = sys.argv[1:]
ca = None
tensor_file = None
while args[:1] in (["--ca"], ["--tensor"]):
    if args[0] == "--ca":
        ca = args[1]
    else:
        tensor_file = args[1]
    args = args[2:]
target, model, *images = args
if ca:
    client = grpcclient.InferenceServerClient(url=target, ssl=True, root_certificates=ca)
else:
    client = grpcclient.InferenceServerClient(url=target)
out = {
    "live": client.is_server_live(),
    "ready": client.is_server_ready(),
    "model_ready": client.is_model_ready(model),
}
meta = client.get_model_metadata(model, as_json=True)
out["metadata"] = {"name": meta["name"], "versions": meta.get("versions", []),
                   "inputs": [i["name"] + ":" + i["datatype"] for i in meta["inputs"]]}
data = np.array([open(p, "rb").read() for p in images], dtype=np.object_)
inp = grpcclient.InferInput("images", [len(images)], "BYTES")
inp.set_data_from_numpy(data)
outputs = [grpcclient.InferRequestedOutput("classes"), grpcclient.InferRequestedOutput("scores")]
result = client.infer(model, [inp], outputs=outputs, parameters={"top_k": 5})
classes = result.as_numpy("classes")
scores = result.as_numpy("scores")
out["images"] = [
    [[c.decode() if isinstance(c, bytes) else str(c), float(s)] for c, s in zip(classes[i], scores[i])]
    for i in range(len(images))
]
if tensor_file:
    shape = [int(x) for x in open(tensor_file + ".shape").read().split(",")]
    tensor = grpcclient.InferInput("input", shape, "FP32")
    tensor.set_data_from_numpy(np.fromfile(tensor_file, dtype="<f4").reshape(shape))
    result = client.infer(model, [tensor])
    out["tensor"] = result.as_numpy("scores").astype(float).tolist()
    result = client.infer(model, [tensor], outputs=outputs, parameters={"top_k": 5})
    classes = result.as_numpy("classes")
    scores = result.as_numpy("scores")
    out["tensor_top"] = [
        [[c.decode() if isinstance(c, bytes) else str(c), float(s)] for c, s in zip(classes[0], scores[0])]
    ]
print(json.dumps(out))
