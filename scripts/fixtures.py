#!/usr/bin/env python3
"""Build the seeded Inception V3 test fixtures (run through scripts/fixtures.sh).

Every model written here is the real Inception V3 architecture with SEEDED, synthetic
weights: it is NOT a real classifier, its class names are `seeded_class_NNNN`.

What makes the seeded model useful for equivalence tests:
  * the batch-norm moving statistics are calibrated on a fixed batch (so activations are
    normalised, not the untrained 0/1 statistics that make every class 0.001), and
  * the final Dense layer is centred and scaled so that the softmax is peaked and different
    inputs give different top-5 classes.

Artefacts (all in OUT_DIR, described in OUT_DIR/fixtures.json):
  inception_v3_seeded/1/                TF2 SavedModel, signature serving_default
  inception_v3_seeded_jpeg/1/           TF1 SavedModel (TF Serving example style), JPEG input
  inception_v3_seeded_jpeg_tf2/1/       the same code run under TF 2.x's tf.compat.v1 without
                                        disable_v2_behavior(): map_fn is a control-flow-v2 While
  inception_v3_seeded_frozen.pb         frozen GraphDef, batch norm left as arithmetic
  inception_v3_seeded_nhwc.onnx         tf2onnx, NHWC, symbolic batch
  inception_v3_seeded_nchw.onnx         tf2onnx, inputs_as_nchw, batch 1
  inception_v3_seeded_labels.txt        1000 synthetic labels
  reference/                            fixed inputs and TensorFlow's outputs

Usage: fixtures.py --photos-dir DIR OUT_DIR
The JPEG exports run in child processes (`fixtures.py --jpeg-stage tf1|tf2 WORK OUT_DIR`)
because TF1 graph mode (tf.compat.v1.disable_v2_behavior) is process-wide: the tf1 child
switches it on at start, the tf2 child runs the same graph code with TF 2.x's defaults.
"""

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
import warnings
from collections import Counter

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SEED = 20250101
SIZE = 299
NUM_CLASSES = 1000
ONNX_OPSET = 13
# Exports must agree with TensorFlow within ONNX_TOLERANCE (max abs, probabilities); above
# it the build warns, above HARD_TOLERANCE (a broken export, not float rounding) it fails.
ONNX_TOLERANCE = 1e-5
HARD_TOLERANCE = 1e-4
# Median top-1 probability the final layer is scaled to, over the calibration batch.
TARGET_MEDIAN_TOP1 = 0.4
PHOTOS = ("coffee.jpg", "camera.jpg")

SAVED_MODEL_DIR = "inception_v3_seeded/1"
JPEG_MODEL_DIR = "inception_v3_seeded_jpeg/1"
JPEG_TF2_MODEL_DIR = "inception_v3_seeded_jpeg_tf2/1"
# The JPEG exports: flavour -> (model dir, reference case kind, suffix of the case names).
JPEG_EXPORTS = {
    "tf1": (JPEG_MODEL_DIR, "jpeg", "_jpeg"),
    "tf2": (JPEG_TF2_MODEL_DIR, "jpeg_tf2", "_jpeg_tf2"),
}
JPEG_GRAPHS = {
    "tf1": "TF1 graph, v1 control flow",
    "tf2": "tf.compat.v1 graph under TF 2.x, control-flow-v2 While",
}
FROZEN_PB = "inception_v3_seeded_frozen.pb"
ONNX_NHWC = "inception_v3_seeded_nhwc.onnx"
ONNX_NCHW = "inception_v3_seeded_nchw.onnx"
LABELS_TXT = "inception_v3_seeded_labels.txt"
NOT_A_CLASSIFIER = "seeded weights, not a real classifier"

_T0 = time.time()


def log(msg):
    print(f"[fixtures {time.time() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def labels():
    return [f"seeded_class_{i:04d}" for i in range(NUM_CLASSES)]


def write_f32(path, array):
    import numpy as np

    np.ascontiguousarray(array, dtype="<f4").tofile(path)


def top5(probs):
    import numpy as np

    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    idx = [int(i) for i in np.argsort(-p, kind="stable")[:5]]
    return idx, [float(p[i]) for i in idx]


def op_histogram(graph_def):
    ops = Counter(n.op for n in graph_def.node)
    for f in graph_def.library.function:
        ops.update(n.op for n in f.node_def)
    return dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0])))


def file_size(path):
    if os.path.isdir(path):
        return sum(
            os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs
        )
    return os.path.getsize(path)


# --------------------------------------------------------------------------- images


def photo_resized(path):
    """Full image, PIL bilinear to 299x299, x/127.5-1 (the Inception preset)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)
        return np.asarray(im, dtype=np.float32) / 127.5 - 1.0


def upsample_bilinear(a, size=SIZE):
    import numpy as np

    h, w, _ = a.shape
    ys, xs = np.linspace(0, h - 1, size), np.linspace(0, w - 1, size)
    y0 = np.floor(ys).astype(int).clip(0, h - 2) if h > 1 else np.zeros(size, int)
    x0 = np.floor(xs).astype(int).clip(0, w - 2) if w > 1 else np.zeros(size, int)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    a00, a01 = a[y0][:, x0], a[y0][:, x0 + 1]
    a10, a11 = a[y0 + 1][:, x0], a[y0 + 1][:, x0 + 1]
    return (a00 * (1 - fx) + a01 * fx) * (1 - fy) + (a10 * (1 - fx) + a11 * fx) * fy


def smooth_noise(rng, res):
    return upsample_bilinear(rng.uniform(-1, 1, (res, res, 3))).clip(-1, 1)


def sinusoids(rng):
    import numpy as np

    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    chans = []
    for _ in range(3):
        fx, fy = rng.uniform(1, 12, 2)
        phase = rng.uniform(0, 2 * np.pi)
        chans.append(np.sin(2 * np.pi * (fx * xx + fy * yy) + phase))
    return np.stack(chans, -1)


def dead_leaves(rng, n=600, rmin=2.0, rmax=120.0):
    """Occluding random discs with scale-invariant radii: natural-image-like statistics."""
    import numpy as np

    img = np.empty((SIZE, SIZE, 3))
    img[:] = rng.uniform(-1, 1, 3)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    u = rng.uniform(0, 1, n)
    radii = 1.0 / np.sqrt(u / rmin**2 + (1 - u) / rmax**2)
    for r in radii:
        cy, cx = rng.uniform(-rmax / 4, SIZE + rmax / 4, 2)
        y0, y1 = int(max(0, cy - r)), int(min(SIZE, cy + r + 1))
        x0, x1 = int(max(0, cx - r)), int(min(SIZE, cx + r + 1))
        if y0 >= y1 or x0 >= x1:
            continue
        disc = (yy[y0:y1, x0:x1] - cy) ** 2 + (xx[y0:y1, x0:x1] - cx) ** 2 <= r * r
        img[y0:y1, x0:x1][disc] = rng.uniform(-1, 1, 3)
    return img


def photo_crops(rng, path, n):
    import numpy as np
    from PIL import Image

    out = []
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        for _ in range(n):
            f = rng.uniform(0.4, 0.9)
            cw, ch = int(w * f), int(h * f)
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            crop = im.crop((x0, y0, x0 + cw, y0 + ch)).resize((SIZE, SIZE), Image.BILINEAR)
            if rng.uniform() < 0.5:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            out.append(np.asarray(crop, dtype=np.float32) / 127.5 - 1.0)
    return out


def calibration_batch(photos_dir):
    """19 fixed images: photo crops, dead leaves, smooth noise, sinusoids, white noise."""
    import numpy as np

    rng = np.random.default_rng(SEED)
    imgs = []
    for name in PHOTOS:
        imgs += photo_crops(rng, os.path.join(photos_dir, name), 3)
    imgs += [dead_leaves(rng) for _ in range(6)]
    imgs += [smooth_noise(rng, r) for r in (4, 16, 64)]
    imgs += [sinusoids(rng) for _ in range(2)]
    imgs += [rng.uniform(-1, 1, (SIZE, SIZE, 3)) for _ in range(2)]
    return np.stack(imgs).astype(np.float32)


def reference_inputs(photos_dir):
    """name -> (description, [1,299,299,3] float32 in [-1,1])."""
    import numpy as np

    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
    r = np.hypot(xx - 0.5, yy - 0.5)
    cases = {
        "noise_uniform": (
            f"uniform noise in [-1,1], numpy default_rng({SEED + 1})",
            np.random.default_rng(SEED + 1).uniform(-1, 1, (SIZE, SIZE, 3)),
        ),
        "gradient": (
            "linear ramps: R = 2x-1, G = 2y-1, B = x+y-1 (x, y in [0,1])",
            np.stack([2 * xx - 1, 2 * yy - 1, xx + yy - 1], -1),
        ),
        "rings": (
            "R = sin(16 pi r), G = cos(10 pi r), B = sin(6 pi (x-y)), r = distance to centre",
            np.stack(
                [
                    np.sin(2 * np.pi * 8 * r),
                    np.cos(2 * np.pi * 5 * r),
                    np.sin(2 * np.pi * 3 * (xx - yy)),
                ],
                -1,
            ),
        ),
    }
    for name in PHOTOS:
        stem = os.path.splitext(name)[0]
        cases[f"{stem}_resized"] = (
            f"{name}: full image, PIL bilinear resize to 299x299, RGB, x/127.5-1",
            photo_resized(os.path.join(photos_dir, name)),
        )
    return {
        k: (d, np.clip(a, -1, 1).astype(np.float32)[None]) for k, (d, a) in cases.items()
    }


# --------------------------------------------------------------------------- model


def build_model(photos_dir):
    import numpy as np
    import keras

    random.seed(SEED)
    np.random.seed(SEED)
    keras.utils.set_random_seed(SEED)
    log("building keras.applications.InceptionV3(weights=None)")
    model = keras.applications.InceptionV3(weights=None, classes=NUM_CLASSES)
    init_digest = weights_digest(model)

    # Seeded batch-norm offsets in [0.5, 1.5] instead of 0: keeps most ReLUs active, which
    # makes the random network well conditioned (with beta = 0 it amplifies float rounding
    # ~50x, so TF and ONNX Runtime disagree by ~1e-4), and a lost beta shows.
    beta_rng = np.random.default_rng(SEED + 2)
    bns = [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]
    for layer in bns:
        layer.beta.assign(beta_rng.uniform(0.5, 1.5, layer.beta.shape).astype(np.float32))

    calib = calibration_batch(photos_dir)
    log(f"calibrating batch-norm statistics on a fixed batch of {len(calib)} images")
    for layer in bns:
        layer.momentum = 0.0  # moving stats := this batch's stats
    model(calib, training=True)
    for layer in bns:
        layer.momentum = 0.99
    var0 = bns[0].moving_variance.numpy()
    if np.allclose(var0, 1.0):
        raise SystemExit("batch-norm calibration did not change the moving statistics")

    log("centring and scaling the final Dense layer")
    features = keras.Model(model.inputs, model.get_layer("avg_pool").output)
    feats = features(calib, training=False).numpy().astype(np.float64)
    dense = model.get_layer("predictions")
    kernel, bias = (w.astype(np.float64) for w in dense.get_weights())
    centred = (feats - feats.mean(0)) @ kernel

    def median_top1(scale):
        z = centred * scale
        z -= z.max(1, keepdims=True)
        p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
        return float(np.median(p.max(1)))

    lo, hi = 1.0, 1024.0
    for _ in range(60):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if median_top1(mid) < TARGET_MEDIAN_TOP1 else (lo, mid)
    scale = float(np.float32(round(hi, 3)))
    new_kernel = (kernel * scale).astype(np.float32)
    new_bias = (bias - scale * (feats.mean(0) @ kernel)).astype(np.float32)
    dense.set_weights([new_kernel, new_bias])
    calib_info = {
        "batch": f"{len(calib)} images: 3 random crops of each of {', '.join(PHOTOS)}, "
        "6 dead-leaves images, 3 smooth-noise, 2 sinusoid, 2 uniform-noise images",
        "batch_norm": "beta = seeded uniform [0.5, 1.5]; moving mean/variance = statistics "
        "of the calibration batch (momentum 0, one forward pass with training=True)",
        "dense": "kernel *= scale; bias = -scale * mean_calibration_features @ kernel, "
        f"scale chosen so the median top-1 over the calibration batch is {TARGET_MEDIAN_TOP1}",
        "dense_scale": scale,
        "median_top1_calibration": median_top1(scale),
    }
    log(f"dense scale {scale}, median top-1 on calibration batch {median_top1(scale):.3f}")
    return model, init_digest, calib_info


def weights_digest(model):
    import numpy as np

    h = hashlib.sha256()
    for w in model.weights:
        h.update(w.path.encode())
        h.update(np.ascontiguousarray(w.numpy(), dtype="<f4").tobytes())
    return h.hexdigest()


def keras_plan(model):
    """The functional graph as a list of layers in topological order (for the TF1 rebuild)."""
    ids = {}

    def tid(t):
        return ids.setdefault(id(t), f"t{len(ids)}")

    plan = []
    for layer in model.operations:
        if len(layer._inbound_nodes) != 1:
            raise SystemExit(f"layer {layer.name} is called {len(layer._inbound_nodes)} times")
        node = layer._inbound_nodes[0]
        kind = type(layer).__name__
        cfg = layer.get_config()
        entry = {
            "name": layer.name,
            "type": kind,
            "inputs": [tid(t) for t in node.input_tensors],
            "output": tid(node.output_tensors[0]),
            "weights": {w.name: w.path for w in layer.weights},
        }
        if kind == "Conv2D":
            assert cfg["dilation_rate"] == (1, 1) and cfg["groups"] == 1, cfg
            assert not cfg["use_bias"] and cfg["activation"] == "linear", cfg
            entry.update(strides=list(cfg["strides"]), padding=cfg["padding"])
        elif kind == "BatchNormalization":
            assert cfg["axis"] in (3, -1) and cfg["center"] and not cfg["scale"], cfg
            entry.update(epsilon=cfg["epsilon"])
        elif kind == "Activation":
            assert cfg["activation"] == "relu", cfg
        elif kind in ("MaxPooling2D", "AveragePooling2D"):
            entry.update(
                pool_size=list(cfg["pool_size"]),
                strides=list(cfg["strides"]),
                padding=cfg["padding"],
            )
        elif kind == "Concatenate":
            assert cfg["axis"] in (3, -1), cfg
        elif kind == "Dense":
            assert cfg["activation"] == "softmax" and cfg["use_bias"], cfg
        elif kind not in ("InputLayer", "GlobalAveragePooling2D"):
            raise SystemExit(f"unexpected layer type {kind} ({layer.name})")
        plan.append(entry)
    return plan


# --------------------------------------------------------------------------- exports


def export_saved_model(model, path):
    import tensorflow as tf
    import keras

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        name="serving_default",
        fn=lambda images: {"probabilities": model(images, training=False)},
        input_signature=[tf.TensorSpec([None, SIZE, SIZE, 3], tf.float32, name="input")],
    )
    archive.write_out(path, verbose=False)


def frozen_graph_def(model, batch):
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    @tf.function(
        input_signature=[tf.TensorSpec([batch, SIZE, SIZE, 3], tf.float32, name="input")]
    )
    def serve(x):
        return tf.identity(model(x, training=False), name="probabilities")

    # Freezing only inlines functions; no grappler pass: batch norm stays Mul/Sub/Rsqrt/AddV2.
    frozen = convert_variables_to_constants_v2(serve.get_concrete_function())
    gd = frozen.graph.as_graph_def()
    gd = tf.compat.v1.graph_util.extract_sub_graph(gd, ["probabilities"])
    names = {n.name: n for n in gd.node}
    assert names["input"].op == "Placeholder", names["input"].op
    return gd


def graph_def_runner(gd):
    import tensorflow as tf

    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(gd, name="")
    sess = tf.compat.v1.Session(graph=graph)
    return lambda x: sess.run("probabilities:0", {"input:0": x})


def to_onnx(gd, path, nchw):
    import tf2onnx

    model_proto, _ = tf2onnx.convert.from_graph_def(
        gd,
        input_names=["input:0"],
        output_names=["probabilities:0"],
        opset=ONNX_OPSET,
        inputs_as_nchw=["input:0"] if nchw else None,
        tensors_to_rename={"input:0": "input", "probabilities:0": "probabilities"},
    )
    for value in list(model_proto.graph.input) + list(model_proto.graph.output):
        dim0 = value.type.tensor_type.shape.dim[0]
        if dim0.HasField("dim_param"):
            dim0.dim_param = "batch"
    with open(path, "wb") as f:
        f.write(model_proto.SerializeToString(deterministic=True))
    return model_proto


def onnx_io(model_proto):
    def desc(v):
        dims = [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        return {"name": v.name, "shape": dims, "dtype": "float32"}

    return {
        "inputs": [desc(v) for v in model_proto.graph.input],
        "outputs": [desc(v) for v in model_proto.graph.output],
    }


def signature_info(saved_model_dir):
    """What `saved_model_cli show --all` prints, as data."""
    from tensorflow.core.protobuf import saved_model_pb2
    from tensorflow.python.framework import dtypes

    sm = saved_model_pb2.SavedModel()
    with open(os.path.join(saved_model_dir, "saved_model.pb"), "rb") as f:
        sm.ParseFromString(f.read())
    out = {}
    for mg in sm.meta_graphs:
        tags = ",".join(mg.meta_info_def.tags)
        for key, sig in sorted(mg.signature_def.items()):
            if key.startswith("__"):
                continue

            def io(m):
                return {
                    k: {
                        "name": v.name,
                        "dtype": dtypes.as_dtype(v.dtype).name,
                        "shape": [-1 if d.size < 0 else d.size for d in v.tensor_shape.dim]
                        if not v.tensor_shape.unknown_rank
                        else None,
                    }
                    for k, v in sorted(m.items())
                }

            out[f"{tags}:{key}"] = {
                "method_name": sig.method_name,
                "inputs": io(sig.inputs),
                "outputs": io(sig.outputs),
            }
    return sm, out


# --------------------------------------------------------------------------- TF1 stage


def jpeg_stage(flavour, work, out_dir):
    """TF Serving `inception_saved_model.py` style export: JPEG strings in, top-5 out.

    flavour "tf1": TF1 graph mode (disable_v2_behavior), so map_fn is a v1 while loop over
    TensorArrays. "tf2": the same tf.compat.v1 code under TF 2.x's defaults, as users run the
    TF Serving example today: map_fn becomes a control-flow-v2 While op whose cond and body
    are library functions, with TensorList ops and DecodeJpeg inside the body function.
    """
    import numpy as np
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")  # the TF1 API is deprecated; that is the point here
    if flavour == "tf1":
        tf.compat.v1.disable_v2_behavior()  # TF1 graph mode: ref variables, v1 control flow
        tf.compat.v1.disable_control_flow_v2()
    v1 = tf.compat.v1
    model_dir, _, _ = JPEG_EXPORTS[flavour]
    tag = f"[jpeg {flavour}]"

    with open(os.path.join(work, "plan.json")) as f:
        plan = json.load(f)
    weights = np.load(os.path.join(work, "weights.npz"))
    export_dir = os.path.join(out_dir, model_dir)

    def preprocess_image(image_buffer):
        # Exactly the TF Serving inception_saved_model.py preprocessing.
        image = v1.image.decode_jpeg(image_buffer, channels=3)
        image = v1.image.convert_image_dtype(image, dtype=tf.float32)
        image = v1.image.central_crop(image, central_fraction=0.875)
        image = tf.expand_dims(image, 0)
        image = v1.image.resize_bilinear(image, [SIZE, SIZE], align_corners=False)
        image = tf.squeeze(image, [0])
        image = tf.subtract(image, 0.5)
        image = tf.multiply(image, 2.0)
        return image

    graph = tf.Graph()
    variables = {}
    with graph.as_default():
        jpegs = v1.placeholder(tf.string, shape=[None], name="images")
        images = v1.map_fn(preprocess_image, jpegs, dtype=tf.float32)
        tensors = {}

        def var(path, shape):
            scope, name = path.rsplit("/", 1)
            with v1.variable_scope(scope, auxiliary_name_scope=False):
                with v1.name_scope(scope + "/"):
                    v = v1.get_variable(
                        name, shape, tf.float32, initializer=v1.zeros_initializer(),
                        use_resource=False,
                    )
            variables[path] = v
            return v

        logits = None
        for op in plan:
            kind, name, w = op["type"], op["name"], op["weights"]
            xs = [tensors[i] for i in op["inputs"]]
            if kind == "InputLayer":
                y = images
            elif kind == "Conv2D":
                kernel = var(w["kernel"], weights[w["kernel"]].shape)
                with v1.name_scope(name + "/"):
                    y = tf.nn.conv2d(
                        xs[0], kernel, [1, *op["strides"], 1], op["padding"].upper()
                    )
            elif kind == "BatchNormalization":
                beta = var(w["beta"], weights[w["beta"]].shape)
                mean = var(w["moving_mean"], weights[w["moving_mean"]].shape)
                variance = var(w["moving_variance"], weights[w["moving_variance"]].shape)
                with v1.name_scope(name + "/"):
                    ones = tf.constant(np.ones(beta.shape, np.float32), name="gamma")
                    y, _, _ = v1.nn.fused_batch_norm(
                        xs[0], ones, beta, mean=mean, variance=variance,
                        epsilon=op["epsilon"], is_training=False,
                    )
            elif kind == "Activation":
                y = tf.nn.relu(xs[0], name=name)
            elif kind in ("MaxPooling2D", "AveragePooling2D"):
                pool = v1.nn.max_pool if kind == "MaxPooling2D" else v1.nn.avg_pool
                y = pool(
                    xs[0], [1, *op["pool_size"], 1], [1, *op["strides"], 1],
                    op["padding"].upper(), name=name,
                )
            elif kind == "Concatenate":
                y = tf.concat(xs, 3, name=name)
            elif kind == "GlobalAveragePooling2D":
                y = tf.reduce_mean(xs[0], [1, 2], name=name)
            elif kind == "Dense":
                kernel = var(w["kernel"], weights[w["kernel"]].shape)
                bias = var(w["bias"], weights[w["bias"]].shape)
                with v1.name_scope(name + "/"):
                    y = tf.nn.bias_add(tf.matmul(xs[0], kernel), bias)
                logits = y
            else:
                raise SystemExit(f"unexpected layer type {kind}")
            tensors[op["output"]] = y
        probabilities = tf.nn.softmax(logits, name="probabilities")
        values, indices = tf.nn.top_k(probabilities, k=5, name="top_k")
        scores = tf.identity(values, name="scores")
        class_names = tf.constant(labels(), dtype=tf.string, name="class_names")
        classes = tf.gather(class_names, indices, name="classes")
        init = v1.global_variables_initializer()

        with v1.Session(graph=graph) as sess:
            sess.run(init)
            for path, v in variables.items():
                v.load(weights[path], sess)
            signature = v1.saved_model.predict_signature_def(
                inputs={"images": jpegs}, outputs={"classes": classes, "scores": scores}
            )
            builder = v1.saved_model.Builder(export_dir)
            builder.add_meta_graph_and_variables(
                sess,
                [v1.saved_model.tag_constants.SERVING],
                signature_def_map={"predict_images": signature, "serving_default": signature},
                strip_default_attrs=True,
            )
            builder.save()
    names = {
        "preprocessed": images.name,
        "probabilities": probabilities.name,
        "variable_op": variables[plan[1]["weights"]["kernel"]].op.type,
        "loop_output_op": images.op.type,
    }
    print(f"{tag} saved {export_dir} (images from {images.op.type})", file=sys.stderr, flush=True)

    # Run the export as TF Serving would: load it fresh, feed JPEG bytes.
    results = {}
    graph = tf.Graph()
    with graph.as_default(), v1.Session(graph=graph) as sess:
        meta = v1.saved_model.loader.load(sess, ["serve"], export_dir)
        sig = meta.signature_def["serving_default"]
        fetch = {
            "scores": sig.outputs["scores"].name,
            "classes": sig.outputs["classes"].name,
            "preprocessed": names["preprocessed"],
            "probabilities": names["probabilities"],
        }
        for name in PHOTOS:
            with open(os.path.join(work, name), "rb") as f:
                data = f.read()
            out = sess.run(fetch, {sig.inputs["images"].name: [data]})
            stem = os.path.splitext(name)[0]
            for k, v in out.items():
                if v.dtype == object:
                    v = np.array([[c.decode() for c in row] for row in v])
                results[f"{stem}/{k}"] = v
    np.savez(os.path.join(work, f"jpeg_{flavour}_results.npz"), **results)
    with open(os.path.join(work, f"jpeg_{flavour}_names.json"), "w") as f:
        json.dump(names, f)
    print(f"{tag} ran the export on the JPEG references", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- main


def main_stage(photos_dir, out_dir):
    import numpy as np
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    warnings.filterwarnings("ignore", message="The structure of `inputs`")
    for name in PHOTOS:
        if not os.path.isfile(os.path.join(photos_dir, name)):
            raise SystemExit(f"missing photo {os.path.join(photos_dir, name)}")
    os.makedirs(out_dir, exist_ok=True)
    work = os.path.join(out_dir, ".work")
    ref_dir = os.path.join(out_dir, "reference")
    os.makedirs(work, exist_ok=True)
    os.makedirs(ref_dir, exist_ok=True)
    for name in PHOTOS:
        shutil.copyfile(os.path.join(photos_dir, name), os.path.join(ref_dir, name))
        shutil.copyfile(os.path.join(photos_dir, name), os.path.join(work, name))

    model, init_digest, calib_info = build_model(photos_dir)
    digest = weights_digest(model)

    # The JPEG exports run in parallel in their own processes (TF1 mode is process-wide).
    plan = keras_plan(model)
    with open(os.path.join(work, "plan.json"), "w") as f:
        json.dump(plan, f)
    np.savez(os.path.join(work, "weights.npz"), **{w.path: w.numpy() for w in model.weights})
    children = {}
    try:
        for flavour in JPEG_EXPORTS:
            log(f"starting the {flavour} JPEG export (child process)")
            children[flavour] = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--jpeg-stage", flavour, work, out_dir],
                stdout=sys.stderr,
            )
        export_and_verify(
            model, children, photos_dir, out_dir, work, init_digest, digest, calib_info
        )
    finally:
        for child in children.values():
            if child.poll() is None:
                child.kill()
                child.wait()


def export_and_verify(model, children, photos_dir, out_dir, work, init_digest, digest, calib_info):
    """Write the TF2, frozen and ONNX exports, the references and the manifests."""
    import numpy as np
    import tensorflow as tf
    import onnxruntime as ort

    ref_dir = os.path.join(out_dir, "reference")

    with open(os.path.join(out_dir, LABELS_TXT), "w") as f:
        f.write("\n".join(labels()) + "\n")

    log("exporting the TF2 SavedModel")
    sm_path = os.path.join(out_dir, SAVED_MODEL_DIR)
    export_saved_model(model, sm_path)
    serving = tf.saved_model.load(sm_path).signatures["serving_default"]

    log("freezing the graph")
    gd1 = frozen_graph_def(model, 1)
    with open(os.path.join(out_dir, FROZEN_PB), "wb") as f:
        f.write(gd1.SerializeToString(deterministic=True))
    gd_batch = frozen_graph_def(model, None)

    log("converting to ONNX (tf2onnx, NHWC symbolic batch)")
    nhwc = to_onnx(gd_batch, os.path.join(out_dir, ONNX_NHWC), nchw=False)
    log("converting to ONNX (tf2onnx, inputs_as_nchw)")
    nchw = to_onnx(gd1, os.path.join(out_dir, ONNX_NCHW), nchw=True)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess_nhwc = ort.InferenceSession(
        os.path.join(out_dir, ONNX_NHWC), so, providers=["CPUExecutionProvider"]
    )
    sess_nchw = ort.InferenceSession(
        os.path.join(out_dir, ONNX_NCHW), so, providers=["CPUExecutionProvider"]
    )

    def ort_diffs(x, want):
        a = sess_nhwc.run(["probabilities"], {"input": x})[0]
        b = sess_nchw.run(["probabilities"], {"input": x.transpose(0, 3, 1, 2).copy()})[0]
        return float(np.abs(a - want).max()), float(np.abs(b - want).max())

    log("computing reference outputs")
    run_frozen = graph_def_runner(gd1)
    cases, all_top5 = [], {}
    worst = {"onnx_nhwc": 0.0, "onnx_nchw": 0.0, "frozen_graph": 0.0, "keras": 0.0}
    for name, (desc, x) in reference_inputs(photos_dir).items():
        probs = serving(input=tf.constant(x))["probabilities"].numpy()
        d_keras = float(np.abs(model(x, training=False).numpy() - probs).max())
        d_frozen = float(np.abs(run_frozen(x) - probs).max())
        d_nhwc, d_nchw = ort_diffs(x, probs)
        for k, v in zip(worst, (d_nhwc, d_nchw, d_frozen, d_keras)):
            worst[k] = max(worst[k], v)
        write_f32(os.path.join(ref_dir, f"{name}.input.f32"), x)
        write_f32(os.path.join(ref_dir, f"{name}.probs.f32"), probs[0])
        idx, p = top5(probs)
        all_top5[name] = idx
        cases.append(
            {
                "name": name,
                "kind": "tensor",
                "description": desc,
                "input": f"{name}.input.f32",
                "input_shape": [1, SIZE, SIZE, 3],
                "layout": "NHWC",
                "value_range": [-1.0, 1.0],
                "output": f"{name}.probs.f32",
                "output_shape": [NUM_CLASSES],
                "computed_by": f"TensorFlow, {SAVED_MODEL_DIR} serving_default",
                "top5_indices": idx,
                "top5_probabilities": p,
                "top5_labels": [labels()[i] for i in idx],
                "max_abs_diff": {
                    "keras_model": d_keras,
                    "frozen_graph": d_frozen,
                    "onnxruntime_nhwc": d_nhwc,
                    "onnxruntime_nchw": d_nchw,
                },
            }
        )
        log(f"  {name:16s} top5 {idx} p {[round(v, 4) for v in p]} "
            f"ort diff {d_nhwc:.2e}/{d_nchw:.2e}")

    jpeg_names = {}
    for flavour, (model_dir, kind, suffix) in JPEG_EXPORTS.items():
        log(f"waiting for the {flavour} JPEG export")
        child = children[flavour]
        if child.wait() != 0:
            raise SystemExit(f"{flavour} JPEG export failed (exit {child.returncode})")
        with open(os.path.join(work, f"jpeg_{flavour}_names.json")) as f:
            jpeg_names[flavour] = json.load(f)
        cases += jpeg_cases(
            flavour, serving, ort_diffs, work, ref_dir, worst, all_top5, jpeg_names[flavour]
        )
    if jpeg_names["tf2"]["loop_output_op"] != "TensorListStack":
        raise SystemExit(
            "the tf2 JPEG export's images come from "
            f"{jpeg_names['tf2']['loop_output_op']}, not a control-flow-v2 TensorListStack"
        )
    finish_fixtures(
        out_dir, work, ref_dir, sm_path, gd1, nhwc, nchw, cases, all_top5, worst,
        jpeg_names, init_digest, digest, calib_info,
    )


def jpeg_cases(flavour, serving, ort_diffs, work, ref_dir, worst, all_top5, names):
    """Reference cases of one JPEG export: TF's preprocessed tensor and probabilities."""
    import numpy as np
    import tensorflow as tf

    model_dir, kind, suffix = JPEG_EXPORTS[flavour]
    jpeg = np.load(os.path.join(work, f"jpeg_{flavour}_results.npz"))
    cases = []
    for photo in PHOTOS:
        stem = os.path.splitext(photo)[0]
        name = f"{stem}{suffix}"
        pre = jpeg[f"{stem}/preprocessed"].astype(np.float32)
        probs = jpeg[f"{stem}/probabilities"].astype(np.float32)
        scores = [float(v) for v in jpeg[f"{stem}/scores"][0]]
        classes = [str(c) for c in jpeg[f"{stem}/classes"][0]]
        assert pre.shape == (1, SIZE, SIZE, 3), pre.shape
        keras_probs = serving(input=tf.constant(pre))["probabilities"].numpy()
        d_keras = float(np.abs(keras_probs - probs).max())
        d_nhwc, d_nchw = ort_diffs(pre, probs)
        worst["onnx_nhwc"] = max(worst["onnx_nhwc"], d_nhwc)
        worst["onnx_nchw"] = max(worst["onnx_nchw"], d_nchw)
        key = f"tf2_saved_model_vs_{flavour}_jpeg_graph"
        worst[key] = max(worst.get(key, 0.0), d_keras)
        idx, p = top5(probs)
        if [labels()[i] for i in idx] != classes:
            raise SystemExit(f"{name}: signature classes {classes} != top-5 {idx}")
        if max(abs(a - b) for a, b in zip(p, scores)) > 1e-6:
            raise SystemExit(f"{name}: signature scores {scores} != top-5 {p}")
        write_f32(os.path.join(ref_dir, f"{name}.preprocessed.f32"), pre)
        write_f32(os.path.join(ref_dir, f"{name}.probs.f32"), probs[0])
        all_top5[name] = idx
        cases.append(
            {
                "name": name,
                "kind": kind,
                "description": f"{photo} through {model_dir} ({JPEG_GRAPHS[flavour]}: "
                "decode_jpeg, convert_image_dtype, central_crop 0.875, resize_bilinear "
                "align_corners=False to 299x299, (x-0.5)*2)",
                "jpeg": photo,
                "signature": "serving_default (same as predict_images)",
                "signature_input": {"images": [photo]},
                "signature_outputs": {"scores": scores, "classes": classes},
                "input": f"{name}.preprocessed.f32",
                "input_tensor": names["preprocessed"],
                "input_shape": [1, SIZE, SIZE, 3],
                "layout": "NHWC",
                "value_range": [-1.0, 1.0],
                "output": f"{name}.probs.f32",
                "output_tensor": names["probabilities"],
                "output_shape": [NUM_CLASSES],
                "computed_by": f"TensorFlow, {model_dir} (tf.compat.v1 session)",
                "top5_indices": idx,
                "top5_probabilities": p,
                "top5_labels": [labels()[i] for i in idx],
                "max_abs_diff": {
                    "tf2_saved_model_on_preprocessed": d_keras,
                    "onnxruntime_nhwc": d_nhwc,
                    "onnxruntime_nchw": d_nchw,
                },
            }
        )
        log(f"  {name:16s} top5 {idx} p {[round(v, 4) for v in p]} "
            f"ort diff {d_nhwc:.2e}/{d_nchw:.2e} tf2-vs-{flavour} {d_keras:.2e}")
    return cases


def finish_fixtures(
    out_dir, work, ref_dir, sm_path, gd1, nhwc, nchw, cases, all_top5, worst,
    jpeg_names, init_digest, digest, calib_info,
):
    """Sanity checks, reference.json, README.txt and fixtures.json."""
    import numpy as np
    import tensorflow as tf
    import keras
    import onnx
    import onnxruntime as ort
    import tf2onnx
    import PIL
    import google.protobuf

    # Sanity: the seeded model must discriminate, and every export must agree.
    sets = {k: frozenset(v) for k, v in all_top5.items()}
    tensor_cases = [c["name"] for c in cases if c["kind"] == "tensor"]
    for i, a in enumerate(tensor_cases):
        for b in tensor_cases[i + 1:]:
            if sets[a] == sets[b]:
                raise SystemExit(f"reference cases {a} and {b} have the same top-5 set")
    top1s = [c["top5_probabilities"][0] for c in cases]
    if min(top1s) < 0.02:
        raise SystemExit(f"softmax not peaked enough: top-1 probabilities {top1s}")
    for k, v in worst.items():
        if v > HARD_TOLERANCE:
            raise SystemExit(f"{k} differs from the TF2 SavedModel by {v:.3g}")
        if v > ONNX_TOLERANCE:
            log(f"WARNING: {k} differs from the TF2 SavedModel by {v:.3g} > {ONNX_TOLERANCE}")
    log(f"all reference top-5 sets differ; top-1 in [{min(top1s):.3f}, {max(top1s):.3f}]")
    log("max abs diffs: " + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))

    reference = {
        "note": f"{NOT_A_CLASSIFIER}: Inception V3 architecture with seeded weights; "
        "labels are synthetic (seeded_class_NNNN)",
        "dtype": "float32",
        "byte_order": "little-endian",
        "labels": f"../{LABELS_TXT}",
        "tolerance_hint": "ONNX Runtime matched TensorFlow within "
        f"{max(worst['onnx_nhwc'], worst['onnx_nchw']):.2e} (max abs) on these cases",
        "max_abs_diff": worst,
        "cases": cases,
    }
    with open(os.path.join(ref_dir, "reference.json"), "w") as f:
        json.dump(reference, f, indent=2)

    sm_proto, sm_sigs = signature_info(sm_path)
    jpeg_info = {}
    for flavour, (model_dir, _, _) in JPEG_EXPORTS.items():
        proto, sigs = signature_info(os.path.join(out_dir, model_dir))
        graph_def = proto.meta_graphs[0].graph_def
        jpeg_info[flavour] = {
            "signatures": sigs,
            "preprocessed_tensor": jpeg_names[flavour]["preprocessed"],
            "probabilities_tensor": jpeg_names[flavour]["probabilities"],
            "variable_op": jpeg_names[flavour]["variable_op"],
            "loop_output_op": jpeg_names[flavour]["loop_output_op"],
            "op_histogram": op_histogram(graph_def),
            "library_functions": {
                f.signature.name: dict(Counter(n.op for n in f.node_def).most_common())
                for f in graph_def.library.function
            },
        }
    frozen_hist = op_histogram(gd1)
    sm_hist = op_histogram(sm_proto.meta_graphs[0].graph_def)
    onnx_hist = {
        ONNX_NHWC: dict(Counter(n.op_type for n in nhwc.graph.node).most_common()),
        ONNX_NCHW: dict(Counter(n.op_type for n in nchw.graph.node).most_common()),
    }
    shutil.rmtree(work)

    files = {
        SAVED_MODEL_DIR: {
            "what": "TF2 SavedModel (Keras 3 ExportArchive): serving_default -> "
            "StatefulPartitionedCall into a function capturing the variables",
            "signatures": sm_sigs,
            "op_histogram": sm_hist,
        },
        JPEG_MODEL_DIR: {
            "what": "TF1 SavedModel in the style of TF Serving's inception_saved_model.py: "
            "tf.compat.v1 graph, v1 control flow (map_fn = while loop), JPEG strings in, "
            "decode/crop/resize in the graph, the same network and weights (batch norm as "
            "FusedBatchNormV3, variables as " + jpeg_names["tf1"]["variable_op"] + "), "
            "top-5 scores and class names out",
            **jpeg_info["tf1"],
        },
        JPEG_TF2_MODEL_DIR: {
            "what": "the same tf.compat.v1 code run under TF 2.x without "
            "disable_v2_behavior(): map_fn is one control-flow-v2 While op whose cond and body "
            "are library functions (TensorListReserve/SetItem/Stack, DecodeJpeg inside the "
            "body), the images come from " + jpeg_names["tf2"]["loop_output_op"],
            **jpeg_info["tf2"],
        },
        FROZEN_PB: {
            "what": "frozen GraphDef (convert_variables_to_constants_v2, no grappler): "
            "batch norm is left as Mul/Sub/Rsqrt/AddV2 arithmetic",
            "inputs": [{"name": "input", "dtype": "float32", "shape": [1, SIZE, SIZE, 3],
                        "layout": "NHWC"}],
            "outputs": [{"name": "probabilities", "dtype": "float32",
                         "shape": [1, NUM_CLASSES]}],
            "op_histogram": frozen_hist,
        },
        ONNX_NHWC: {
            "what": f"ONNX (tf2onnx {tf2onnx.__version__}, opset {ONNX_OPSET}), NHWC input, "
            "symbolic batch dimension 'batch'",
            **onnx_io(nhwc),
            "op_histogram": onnx_hist[ONNX_NHWC],
        },
        ONNX_NCHW: {
            "what": f"ONNX (tf2onnx {tf2onnx.__version__}, opset {ONNX_OPSET}, "
            "inputs_as_nchw), NCHW input, batch 1",
            **onnx_io(nchw),
            "op_histogram": onnx_hist[ONNX_NCHW],
        },
        LABELS_TXT: {"what": "1000 synthetic labels, line i is seeded_class_{i:04d}"},
        "reference/": {"what": "fixed inputs (raw little-endian float32) and TensorFlow's "
                       "outputs, described by reference/reference.json"},
        "README.txt": {"what": "this description in one paragraph"},
    }
    readme = (
        "Seeded Inception V3 test fixtures, generated by scripts/fixtures.py "
        f"(seed {SEED}). These are {NOT_A_CLASSIFIER}: the real Inception V3 architecture "
        "with seeded random weights (batch-norm statistics calibrated on a fixed batch, final "
        "layer scaled so the softmax is peaked), and synthetic labels seeded_class_0000 to "
        "seeded_class_0999. Use them to check that a converted model computes what "
        "TensorFlow computes, never to judge classification quality. The same weights are "
        f"exported as a TF2 SavedModel ({SAVED_MODEL_DIR}), a TF1 TF-Serving-style JPEG "
        f"SavedModel ({JPEG_MODEL_DIR}), the same JPEG code exported under TF 2.x "
        f"({JPEG_TF2_MODEL_DIR}, control-flow-v2 While), a frozen GraphDef ({FROZEN_PB}) and two ONNX files "
        f"({ONNX_NHWC}, {ONNX_NCHW}); reference/ holds fixed inputs and TensorFlow's outputs "
        "(reference/reference.json), and fixtures.json lists every file, its inputs and "
        "outputs and the tool versions.\n"
    )
    with open(os.path.join(out_dir, "README.txt"), "w") as f:
        f.write(readme)
    for name, entry in files.items():
        entry["bytes"] = file_size(os.path.join(out_dir, name.rstrip("/")))

    manifest = {
        "note": NOT_A_CLASSIFIER,
        "model": "keras.applications.InceptionV3(weights=None), 1000 classes, softmax",
        "seed": SEED,
        "weights_sha256_initial": init_digest,
        "weights_sha256": digest,
        "calibration": calib_info,
        "versions": {
            "python": sys.version.split()[0],
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "tf2onnx": tf2onnx.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "numpy": np.__version__,
            "pillow": PIL.__version__,
            "protobuf": google.protobuf.__version__,
        },
        "onnx_opset": ONNX_OPSET,
        "files": files,
        "reference": "reference/reference.json",
        "build_seconds": round(time.time() - _T0, 1),
    }
    with open(os.path.join(out_dir, "fixtures.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    log(f"done in {time.time() - _T0:.0f}s")


def main():
    if len(sys.argv) == 5 and sys.argv[1] == "--jpeg-stage":
        jpeg_stage(sys.argv[2], sys.argv[3], sys.argv[4])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--photos-dir", required=True, help="folder with coffee.jpg, camera.jpg")
    parser.add_argument("out_dir", help="output folder (created)")
    args = parser.parse_args()
    main_stage(os.path.abspath(args.photos_dir), os.path.abspath(args.out_dir))


if __name__ == "__main__":
    main()
