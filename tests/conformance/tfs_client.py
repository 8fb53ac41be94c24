"""TensorFlow Serving's own Python client (tensorflow-serving-api) against a pool server.

Usage: python tfs_client.py HOST:PORT MODEL TENSOR_FILE IMAGE...
Prints one JSON document: the Predict answers for the images (signature predict_images,
JPEG bytes, as in the TF Serving Inception example client) and for a float tensor read from
TENSOR_FILE (little-endian float32, with its shape in TENSOR_FILE.shape) through
signature predict_tensor: `scores` of every class, then with the output filter
`classes`, `scores` the top labels and their scores; and GetModelMetadata's signature names.
"""

import json
import sys

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2, prediction_service_pb2_grpc

target, model, tensor_file, *images = sys.argv[1:]
channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 << 20)])
stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)

out = {}
request = predict_pb2.PredictRequest()
request.model_spec.name = model
request.model_spec.signature_name = "predict_images"
data = [open(p, "rb").read() for p in images]
request.inputs["images"].CopyFrom(tf.make_tensor_proto(data, shape=[len(data)]))
result = stub.Predict(request, 30.0)
classes = tf.make_ndarray(result.outputs["classes"])
scores = tf.make_ndarray(result.outputs["scores"])
out["images"] = [
    [[c.decode(), float(s)] for c, s in zip(classes[i], scores[i])] for i in range(len(images))
]

shape = [int(x) for x in open(tensor_file + ".shape").read().split(",")]
values = np.fromfile(tensor_file, dtype="<f4").reshape(shape)
request = predict_pb2.PredictRequest()
request.model_spec.name = model
request.model_spec.signature_name = "predict_tensor"
request.inputs["input"].CopyFrom(tf.make_tensor_proto(values, dtype=tf.float32))
result = stub.Predict(request, 30.0)
out["tensor"] = tf.make_ndarray(result.outputs["scores"]).astype(float).tolist()
request.output_filter.extend(["classes", "scores"])
result = stub.Predict(request, 30.0)
classes = tf.make_ndarray(result.outputs["classes"])
scores = tf.make_ndarray(result.outputs["scores"])
out["tensor_top"] = [[[c.decode(), float(s)] for c, s in zip(classes[0], scores[0])]]

meta = get_model_metadata_pb2.GetModelMetadataRequest()
meta.model_spec.name = model
meta.metadata_field.append("signature_def")
result = stub.GetModelMetadata(meta, 30.0)
from tensorflow_serving.apis import get_model_metadata_pb2 as m  # noqa: E402

defs = m.SignatureDefMap()
result.metadata["signature_def"].Unpack(defs)
out["signatures"] = sorted(defs.signature_def.keys())
print(json.dumps(out))
