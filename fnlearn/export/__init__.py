"""Trained models as files that run without fnlearn's model code: StableHLO (`jax.export`) and ONNX.

    fn = fnlearn.export.classifier(model.apply, variables, CIFAR10_MEAN, CIFAR10_STD)
    fnlearn.export.save("model.zip", fn, (32, 32, 3), {"labels": class_names})
    logits = fnlearn.export.load("model.zip")(uint8_images)
"""
from fnlearn.export.artifact import FORMATS
from fnlearn.export.artifact import PLATFORMS
from fnlearn.export.artifact import Artifact
from fnlearn.export.artifact import ArtifactError
from fnlearn.export.artifact import classifier
from fnlearn.export.artifact import load
from fnlearn.export.artifact import platforms_here
from fnlearn.export.artifact import save
from fnlearn.export.onnx import ExportError
