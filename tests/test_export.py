"""Export: StableHLO and ONNX artifacts give fnlearn's logits, load in a fresh process without
fnlearn's model code, keep the batch dynamic, and fold BatchNorm; the command refuses bad input."""
import collections
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import pytest

from experiments import export as export_experiment
from fnlearn import export, models
from fnlearn.checkpoint import save_variables
from fnlearn.data.augment import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD
from fnlearn.export.onnx import ExportError
from fnlearn.export.onnx import export as to_onnx

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


def trained_like(name, num_classes=10):
    """A model and variables whose BatchNorm statistics, scales and biases are not the init's, so a
    fold that dropped or misplaced any of them would change the logits."""
    model = models.get(name, num_classes=num_classes)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    keys = iter(jax.random.split(jax.random.key(1), 1000))
    noise = lambda a, s: a + s * jax.random.normal(next(keys), a.shape)  # noqa: E731
    stats = {"batch_stats": jax.tree_util.tree_map_with_path(
        lambda path, a: noise(a, 0.1) if path[-1].key == "mean" else a * (1 + 0.5 * jax.random.uniform(next(keys), a.shape)),
        variables["batch_stats"])}
    params = jax.tree_util.tree_map_with_path(
        lambda path, a: noise(a, 0.1) if any(getattr(p, "key", "").startswith(("bn", "downsample_bn")) for p in path)
        else a, variables["params"])
    return model, {"params": params, **stats}


def images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), np.uint8)


@pytest.mark.parametrize("name", ["resnet18", "fastnet"])
def test_onnx_matches_fnlearn_within_1e_4_at_any_batch(tmp_path, name):
    model, variables = trained_like(name)
    fn = export.classifier(model.apply, variables, MEAN, STD)
    export.save(tmp_path / "m.onnx", fn, (32, 32, 3), {"labels": list("abcdefghij")}, format="onnx")
    artifact = export.load(tmp_path / "m.onnx")
    x = images(5)
    expected = np.asarray(jax.jit(fn)(x))  # eval mode: each image's logits are its own, whatever the batch
    assert np.ptp(expected, axis=0).max() > 100 * 1e-4  # they move with the image far more than the tolerance
    for n in (5, 1):  # two batch sizes from one file
        np.testing.assert_allclose(artifact(x[:n]), expected[:n], atol=1e-4, rtol=0)
    assert artifact.labels == list("abcdefghij")


def test_onnx_folds_batchnorm_into_the_convolutions(tmp_path):
    model, variables = trained_like("resnet18")
    fn = export.classifier(model.apply, variables, MEAN, STD)
    export.save(tmp_path / "m.onnx", fn, (32, 32, 3), {"labels": list("abcdefghij")}, format="onnx")
    graph = onnx.load(tmp_path / "m.onnx").graph
    ops = collections.Counter(node.op_type for node in graph.node)
    # ResNet-18 (CIFAR stem): 1 stem conv + 8 blocks x 2 + 3 downsample convs = 20, each with its
    # BatchNorm in its weights and bias: no Mul is left, and the one Sub is the input's mean.
    assert ops["Conv"] == 20 and ops["Mul"] == 0 and ops["Sub"] == 1
    assert "BatchNormalization" not in ops
    batch, = graph.input[0].type.tensor_type.shape.dim[:1]
    assert batch.dim_param == "batch"  # a dynamic batch, by name


def test_onnx_reductions_over_no_axes_are_no_ops():
    import onnxruntime

    fn = lambda x: jnp.sum(x, axis=()) + jnp.max(x, axis=()) + x  # noqa: E731 (JAX: 3x)
    model = to_onnx(fn, jax.ShapeDtypeStruct((2, 3), jnp.float32))
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(session.run(None, {"input_0": x})[0], 3 * x)


def test_onnx_refuses_a_primitive_it_does_not_translate():
    with pytest.raises(ExportError, match="sort"):
        to_onnx(lambda x: jnp.sort(x, axis=-1), jax.ShapeDtypeStruct((2, 3), jnp.float32))
    # A loop is not a call: its body is not inlined once in its place.
    with pytest.raises(ExportError, match="scan"):
        to_onnx(lambda x: jax.lax.scan(lambda c, a: (c + a, c), 0.0, x)[0], jax.ShapeDtypeStruct((3,), jnp.float32))
    # ONNX's Conv and MaxPool take no bfloat16 (onnx's checker would fail on shape inference).
    kernel = jnp.ones((3, 3, 2, 4), jnp.bfloat16)
    conv = lambda x: jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",  # noqa: E731
                                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))
    with pytest.raises(ExportError, match="ONNX's Conv takes no bfloat16: export the model built in float32"):
        to_onnx(conv, jax.ShapeDtypeStruct((1, 5, 5, 2), jnp.bfloat16))


# Each script blocks fnlearn's import first: what it runs cannot come from fnlearn's code.
_FRESH_STABLEHLO = """
import sys; sys.modules["fnlearn"] = None
import json, zipfile
import jax, numpy as np
archive = zipfile.ZipFile(sys.argv[1])
exported = jax.export.deserialize(bytearray(archive.read("exported.bin")))
x = np.load(sys.argv[2])
np.savez(sys.argv[3], *[np.asarray(exported.call(x[:n])) for n in (1, len(x))])
print(json.dumps({"platforms": list(exported.platforms), "labels": json.loads(archive.read("meta.json"))["labels"]}))
"""

_FRESH_ONNX = """
import sys; sys.modules["fnlearn"] = None
import json
import numpy as np, onnxruntime
session = onnxruntime.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
x = np.load(sys.argv[2])
np.savez(sys.argv[3], *[session.run(["logits"], {"images": x[:n]})[0] for n in (1, len(x))])
meta = json.loads(session.get_modelmeta().custom_metadata_map["fnlearn"])
print(json.dumps({"labels": meta["labels"]}))
"""


@pytest.mark.parametrize("fmt, script", [("stablehlo", _FRESH_STABLEHLO), ("onnx", _FRESH_ONNX)],
                         ids=["stablehlo", "onnx"])
def test_artifacts_run_in_a_fresh_process_without_fnlearn(tmp_path, fmt, script):
    model, variables = trained_like("fastnet_tiny")
    fn = export.classifier(model.apply, variables, MEAN, STD)
    path = tmp_path / f"m.{'zip' if fmt == 'stablehlo' else 'onnx'}"
    export.save(path, fn, (32, 32, 3), {"labels": list("abcdefghij")}, format=fmt)
    artifact = export.load(path)
    # XLA's flags as here (fnlearn's CPU settings pick the kernels), so the numbers must be identical.
    env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""), "PATH": os.environ["PATH"]}
    x = images(3)
    np.save(tmp_path / "x.npy", x)
    out = subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "x.npy"), str(tmp_path / "y.npz")],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["labels"] == list("abcdefghij")
    expected = np.asarray(jax.jit(fn)(x))
    with np.load(tmp_path / "y.npz") as fresh:
        for n, key in ((1, "arr_0"), (3, "arr_1")):  # two batch sizes from one artifact
            assert fresh[key].shape == (n, 10)
            np.testing.assert_array_equal(fresh[key], artifact(x[:n]))  # the same program, the same numbers
            np.testing.assert_allclose(fresh[key], expected[:n], atol=1e-5, rtol=0)
    if fmt == "stablehlo":
        assert report["platforms"] == ["cpu", "cuda"]


def test_the_command_exports_a_checkpoint_with_its_model_and_class_names(tmp_path, capsys):
    model, variables = trained_like("fastnet_tiny", num_classes=3)
    save_variables(tmp_path / "weights", jax.device_get(variables),
                   {"model": "fastnet_tiny", "class_names": ["cat", "dog", "frog"]})
    export_experiment.main(["--checkpoint", str(tmp_path / "weights"), "--format", "onnx",
                            "--out", str(tmp_path / "m.onnx")])
    assert "max |logits - fnlearn's|" in capsys.readouterr().out
    artifact = export.load(tmp_path / "m.onnx")
    assert artifact.labels == ["cat", "dog", "frog"] and artifact.meta["model"] == "fastnet_tiny"
    fn = export.classifier(model.apply, variables, CIFAR10_MEAN, CIFAR10_STD)
    np.testing.assert_allclose(artifact(images(2)), np.asarray(fn(images(2))), atol=1e-4, rtol=0)


def test_the_command_takes_the_runs_normalization(tmp_path):
    _, variables = trained_like("fastnet_tiny", num_classes=3)
    save_variables(tmp_path / "weights", jax.device_get(variables),
                   {"config": {"model": "fastnet_tiny", "normalization": "imagenet"}})
    export_experiment.main(["--checkpoint", str(tmp_path / "weights"), "--out", str(tmp_path / "m.zip")])
    meta = export.load(tmp_path / "m.zip").meta
    assert (tuple(meta["mean"]), tuple(meta["std"])) == (IMAGENET_MEAN, IMAGENET_STD)
    export_experiment.main(["--checkpoint", str(tmp_path / "weights"), "--out", str(tmp_path / "n.zip"),
                            "--mean", "0.5,0.5,0.5"])  # a flag given wins
    assert export.load(tmp_path / "n.zip").meta["mean"] == [0.5] * 3


def test_without_onnxruntime_the_command_writes_onnx_and_says_it_is_unchecked(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now fails
    export_experiment.main(["--model", "fastnet_tiny", "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    assert "not checked: onnxruntime is not installed" in capsys.readouterr().out
    assert (tmp_path / "m.onnx").stat().st_size > 0


def test_a_refused_export_leaves_the_file_already_at_out(tmp_path, monkeypatch):
    out = tmp_path / "deployed.onnx"
    export_experiment.main(["--model", "fastnet_tiny", "--out", str(out)])  # onnx, from the name
    deployed = out.read_bytes()
    assert export.load(out).meta["format"] == "onnx"
    # A converter that got the numbers wrong: the check refuses the new file before it replaces the old.
    wrong = lambda path: lambda x: np.full((len(x), 10), 1e3, np.float32)  # noqa: E731
    monkeypatch.setattr(export_experiment.export, "load", wrong)
    with pytest.raises(SystemExit, match=f"a converter bug.*; nothing was written to {out}$"):
        export_experiment.main(["--model", "fastnet_tiny", "--seed", "1", "--out", str(out)])
    assert out.read_bytes() == deployed and sorted(p.name for p in tmp_path.iterdir()) == ["deployed.onnx"]


def test_an_out_that_cannot_be_written_is_named(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: cannot write /proc/fnlearn.zip \(.*\): pick a folder"):
        export_experiment.main(["--model", "fastnet_tiny", "--out", "/proc/fnlearn.zip"])


def test_the_command_refuses_a_checkpoint_of_another_model(tmp_path, capsys):
    model, variables = trained_like("fastnet_tiny", num_classes=3)
    save_variables(tmp_path / "weights", jax.device_get(variables), {"class_names": ["cat", "dog", "frog"]})
    with pytest.raises(SystemExit, match="does not fit --model resnet_tiny"):
        export_experiment.main(["--model", "resnet_tiny", "--checkpoint", str(tmp_path / "weights"),
                                "--out", str(tmp_path / "m.zip")])
    assert not (tmp_path / "m.zip").exists()


@pytest.mark.parametrize("flags, message", [
    (["--model", "fastnet_tiny", "--format", "tflite"], "invalid choice"),
    (["--model", "fastnet_tiny", "--format", "onnx"], "names a .zip file but --format is onnx"),
    (["--model", "fastnet_tiny", "--input-shape", "32,32"], "--input-shape '32,32' is not H,W,C"),
    (["--model", "fastnet_tiny", "--platforms", "cpu,gpu"], "--platforms 'gpu'"),
    (["--model", "fastnet_tiny", "--platforms", ","], "--platforms ''"),
    (["--model", "fastnet_tiny", "--mean", "0.5"], "--mean has 1 values for 3 channels"),
    (["--model", "fastnet_tiny", "--mean", "nan,0,0"], "'nan,0,0' is not comma-separated finite numbers"),
    (["--model", "fastnet_tiny", "--std", "a,b,c"], "'a,b,c' is not comma-separated finite numbers"),
    (["--model", "fastnet_tiny", "--mean", "125,122,113"], "--mean 125,122,113 is not in [0, 1] units"),
    (["--model", "fastnet_tiny", "--labels", "cat,,dog"], "--labels 'cat,,dog' has an empty name"),
    (["--checkpoint", "no/such/run"], "--checkpoint no/such/run: no such folder"),
    ([], "pass --model NAME, or a --checkpoint"),
])
def test_the_command_refuses_bad_flags_in_two_lines(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit:
        export_experiment.main(["--out", str(tmp_path / "m.zip"), *flags])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 2


def test_images_too_small_for_the_model_are_named(tmp_path):
    with pytest.raises(SystemExit, match="--input-shape 2,2,3: fastnet_tiny cannot take such images"):
        export_experiment.main(["--model", "fastnet_tiny", "--out", str(tmp_path / "m.zip"), "--input-shape", "2,2,3"])
    assert not list(tmp_path.iterdir())


def test_a_file_that_is_no_artifact_is_named(tmp_path):
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(export.ArtifactError, match="junk.onnx is not an fnlearn artifact"):
        export.load(tmp_path / "junk.onnx")
    with pytest.raises(export.ArtifactError, match="no such file"):
        export.load(tmp_path / "missing.zip")
    with pytest.raises(export.ArtifactError, match="is a folder, not an exported file"):
        export.load(tmp_path)  # a checkpoint folder, say


def test_labels_must_name_every_logit_and_default_to_their_index(tmp_path):
    model, variables = trained_like("fastnet_tiny")
    fn = export.classifier(model.apply, variables, MEAN, STD)
    with pytest.raises(export.ArtifactError, match="2 labels for 10 logits"):
        export.save(tmp_path / "m.zip", fn, (32, 32, 3), {"labels": ["cat", "dog"]})
    assert not list(tmp_path.iterdir())
    export.save(tmp_path / "m.zip", fn, (32, 32, 3), {}, platforms=("cpu",))
    assert export.load(tmp_path / "m.zip").labels == [str(i) for i in range(10)]
