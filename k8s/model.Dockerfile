# syntax=docker/dockerfile:1
# A model image: the model under /models, for the initContainer (`cp -R /models/. <emptyDir>`)
# or for an image volume (overlays/edge-image-volume mounts its /models). busybox gives the
# initContainer its `cp`; the image runs nothing else.
#
# An edge bundle (overlays/edge, overlays/edge-image-volume), from the directory holding it:
#   docker build -f k8s/model.Dockerfile --build-arg SRC=inception.bundle \
#       --build-arg DEST=/models/model.bundle \
#       -t registry.example.invalid/edge-fleet/model-inception-bundle:1 .
# A TF Serving SavedModel export (overlays/tf-serving), version directories inside:
#   docker build -f k8s/model.Dockerfile --build-arg SRC=export/inception \
#       --build-arg DEST=/models/inception \
#       -t registry.example.invalid/edge-fleet/model-inception-savedmodel:1 .
# Tag model images by model version and never reuse a tag (README: rolling out a new model).
FROM busybox:1.37.0
ARG SRC
ARG DEST
# The files must be readable by others (uid 65532 copies or reads them): mode 644 / 755.
COPY ${SRC} ${DEST}
USER 65532:65532
