"""An image classifier for Seldon MLServer (a KServe v2 server nobody here wrote): a custom
MLServer model class that runs an ONNX classifier with onnxruntime and answers as
classifiers served by MLServer, Triton or KServe commonly do.

Model settings (`parameters.uri`: the ONNX file; `parameters.extra`):
  labels   a text file, one label per output class
  answer   what the reply holds:
           "scores+top5"  `scores` FP32 [N, C] (every class) and `classes` BYTES [N, 5]
           "top5"         `classes` BYTES [N, 5] and `scores` FP32 [N, 5], pairwise
           "scores"       `scores` FP32 [N, C] alone
           "logits+top5"  as "scores+top5" with log-probabilities as `scores` (logits whose
                          softmax is the model's probabilities)
           "classes"      `classes` BYTES [N, 5] alone (no scores: unusable)
The input is the model's preprocessed FP32 tensor, whatever its name. Used by
tests/e2e/mlserver.rs.
"""

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse

ANSWERS = ("scores+top5", "top5", "scores", "logits+top5", "classes")


class OnnxClassifier(MLModel):
    async def load(self) -> bool:
        params = self.settings.parameters
        extra = params.extra or {}
        self.answer = extra["answer"]
        if self.answer not in ANSWERS:
            raise ValueError(f"answer {self.answer!r} is not one of {ANSWERS}")
        with open(extra["labels"], encoding="utf-8") as f:
            self.labels = [line.strip() for line in f if line.strip()]
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(params.uri, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32)
        probs = self.session.run(None, {self.input_name: x})[0].astype(np.float32)
        top = np.argsort(-probs, axis=1, kind="stable")[:, :5]
        classes = np.array([[self.labels[i].encode() for i in row] for row in top], dtype=np.object_)
        top_scores = np.take_along_axis(probs, top, axis=1)
        outputs = {
            "scores+top5": [("scores", probs), ("classes", classes)],
            "top5": [("classes", classes), ("scores", top_scores)],
            "scores": [("scores", probs)],
            "logits+top5": [("scores", np.log(np.maximum(probs, 1e-30))), ("classes", classes)],
            "classes": [("classes", classes)],
        }[self.answer]
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            id=payload.id,
            outputs=[NumpyCodec.encode_output(name, value) for name, value in outputs],
        )
