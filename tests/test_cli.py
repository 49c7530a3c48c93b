"""What a user meets on the experiments' command lines: a `--help` with usage examples and
defaults, and a short error naming the argument for a bad value, before any work starts."""
import argparse
import importlib
import sys

import numpy as np
import pytest

from experiments import cli
from fnlearn.data import Dataset

NAMES = ("regression", "autograd", "tensors", "dynamic", "mnist")
# The benchmarks' command lines: module -> what a user types.
BENCHMARKS = {"benchmarks.__main__": "python -m benchmarks", "benchmarks.profile": "python -m benchmarks.profile",
              "benchmarks.deploy": "python -m benchmarks.deploy"}


def module_of(name):
    return importlib.import_module(name if name in BENCHMARKS else f"experiments.{name}")


def main_of(name):
    return module_of(name).main


@pytest.mark.parametrize("name", NAMES + tuple(BENCHMARKS))
def test_help_shows_prog_usage_examples_and_defaults(name, capsys):
    module = module_of(name)
    prog = BENCHMARKS.get(name, f"python -m experiments.{name}")
    example = next(line.strip() for line in module.__doc__.splitlines()
                   if line.strip().startswith(prog))
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: {prog}" in out
    assert example in out
    assert "default" in out
    assert "(default: None)" not in out


FILE = object()  # stands for the path of an existing file


@pytest.mark.parametrize("name, argv, named", [
    ("regression", ["--epochs", "0"], "--epochs"),
    ("regression", ["--seed", "-1"], "--seed"),
    ("regression", ["--mode", "fast"], "--mode"),
    ("regression", ["--workdir", FILE], "--workdir"),
    ("regression", ["--workdir", "/proc/fnlearn_run"], "--workdir"),  # no folder can be made there
    ("autograd", ["--x", "nan"], "--x"),
    ("autograd", ["--x", "1e20"], "--x"),  # finite, but its derivatives overflow float32
    ("tensors", ["--size", "0"], "--size"),
    ("tensors", ["--repeats", "2.5"], "--repeats"),
    ("tensors", ["--size", "10000000"], "--size"),
    ("cifar", ["--seed", str(2**32 - 1), "--runs", "2"], "--seed"),
    ("detection", ["--canvas-seed", "-1"], "--canvas-seed"),
    ("detection", ["--preset", "smoke", "--batch-size", "2048"], "--batch-size"),
    ("dynamic", ["--n-steps", "11"], "--n-steps"),
    ("dynamic", ["--n-steps", "3", "0"], "--n-steps"),
    ("dynamic", ["--depths", "-1"], "--depths"),
    ("mnist", ["--epochs", "0"], "--epochs"),
    ("mnist", ["--lr", "nan"], "--lr"),
    ("mnist", ["--lr", "0"], "--lr"),
    ("mnist", ["--batch-size", "-1"], "--batch-size"),
    ("mnist", ["--workdir", FILE], "--workdir"),
    ("cifar", ["--coordinator", "127.0.0.1:1234"], "--num-processes, --process-id"),
    ("cifar", ["--coordinator", "127.0.0.1", "--num-processes", "2", "--process-id", "0"], "--coordinator"),
    ("cifar", ["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"], "--process-id 2"),
    ("cifar", ["--num-processes", "0"], "--num-processes"),
    ("benchmarks.__main__", ["--repeats", "0"], "--repeats"),
    ("benchmarks.__main__", ["--epoch-fraction", "1.5"], "--epoch-fraction"),
    ("benchmarks.__main__", ["no_such_workload"], "no_such_workload"),
    ("benchmarks.__main__", ["--json", "no/such/folder/rows.json"], "--json"),
    ("benchmarks.__main__", ["--json", "/sys/fnlearn_rows.json"], "--json"),  # no file can be made there
    ("benchmarks.deploy", ["--json", "/sys/fnlearn_rows.json"], "--json"),
    ("benchmarks.deploy", ["--batches", "0"], "--batches"),
    ("benchmarks.profile", ["fastnet", "--steps", "0"], "--steps"),
    ("benchmarks.profile", ["resnet18", "--batch", "-8"], "--batch"),
    ("benchmarks.profile", [], "net"),
])
def test_bad_argument_is_two_lines_naming_it(name, argv, named, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    argv = [str(a_file) if a is FILE else a for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        main_of(name)(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert 1 <= len(err.strip().splitlines()) <= 2, err
    assert named in err.splitlines()[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("name, argv, missing", [
    ("benchmarks.__main__", ["regression"], "torch"),
    ("benchmarks.deploy", ["infer"], "onnxruntime"),
])
def test_a_benchmark_without_its_extra_says_what_to_install(name, argv, missing, monkeypatch):
    monkeypatch.setitem(sys.modules, missing, None)  # `import` then fails, as where it is not installed
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # deploy sets it; the test leaves it as it was
    with pytest.raises(SystemExit) as exit_info:
        main_of(name)(argv)
    message = exit_info.value.code
    assert message.startswith("error: ") and missing in message and 'pip install -e ".[test]"' in message


def tiny_mnist(n_train=10, n_test=4):
    images = np.zeros((n_train + n_test, 28, 28, 1), np.uint8)
    labels = np.zeros(n_train + n_test, np.int32)
    return Dataset(images[:n_train], labels[:n_train], images[n_train:], labels[n_train:],
                   tuple(map(str, range(10))), "tiny")


def test_mnist_batch_larger_than_training_set_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr("experiments.mnist.load_dataset", lambda *a, **k: tiny_mnist(n_train=10))
    with pytest.raises(SystemExit) as exit_info:
        main_of("mnist")(["--batch-size", "64", "--workdir", str(tmp_path)])
    message = exit_info.value.code  # sys.exit(message) prints it to stderr and exits with 1
    assert message.startswith("error: --batch-size 64") and "10" in message and "\n" not in message


def test_mnist_data_dir_that_is_a_file_is_one_line(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        main_of("mnist")(["--data", str(tmp_path / "no_data"), "--data-dir", str(a_file),
                          "--workdir", str(tmp_path / "run")])
    message = exit_info.value.code
    assert message.startswith("error: ") and str(a_file) in message and "\n" not in message


@pytest.mark.parametrize("parse, text, value", [
    (cli.positive_int, "3", 3),
    (cli.non_negative_int, "0", 0),
    (cli.positive_float, "1e-3", 1e-3),
    (cli.finite_float, "-2.5", -2.5),
    (cli.fraction, "1", 1.0),
    (cli.int_between(1, 10), "10", 10),
    (cli.seed, "0", 0),
])
def test_number_types_accept(parse, text, value):
    assert parse(text) == value


@pytest.mark.parametrize("parse, text", [
    (cli.positive_int, "0"),
    (cli.positive_int, "2.5"),
    (cli.positive_int, "x"),
    (cli.non_negative_int, "-1"),
    (cli.positive_float, "0"),
    (cli.positive_float, "nan"),
    (cli.positive_float, "inf"),
    (cli.finite_float, "-inf"),
    (cli.fraction, "0"),
    (cli.fraction, "1.01"),
    (cli.int_between(1, 10), "11"),
    (cli.int_between(1, 10), "0"),
    (cli.seed, "-1"),
    (cli.seed, str(2**32)),
])
def test_number_types_refuse(parse, text):
    with pytest.raises(argparse.ArgumentTypeError, match=repr(text).replace(".", r"\.")):
        parse(text)


@pytest.mark.parametrize("config, field", [("cifar.CifarConfig", "seed"), ("transfer.TransferConfig", "seed"),
                                           ("detection.DetectionConfig", "seed"),
                                           ("detection.DetectionConfig", "canvas_seed")])
def test_configs_made_in_code_take_the_seeds_the_command_lines_take(config, field):
    module, name = config.split(".")
    config = getattr(importlib.import_module(f"fnlearn.recipes.{module}"), name)
    for good in (0, 2**32 - 1, np.uint32(7)):
        made = getattr(config(**{field: good}), field)
        assert made == good and type(made) is int  # as the saved JSON needs it
    for bad in (-1, 2**32, 1.5, True, "3"):
        with pytest.raises(ValueError, match=f"--{field.replace('_', '-')} {bad!r}: must be a whole number"):
            config(**{field: bad})


def test_check_workdir(tmp_path, capsys):
    parser = cli.make_parser("x", "doc")
    assert cli.check_workdir(parser, tmp_path / "new" / "run") == tmp_path / "new" / "run"
    (tmp_path / "a_file").write_text("")
    for bad in (tmp_path / "a_file", tmp_path / "a_file" / "run"):
        with pytest.raises(SystemExit) as exit_info:
            cli.check_workdir(parser, bad)
        assert exit_info.value.code == 2
        assert "--workdir" in capsys.readouterr().err


def test_the_process_flags_default_to_jaxs_variables(monkeypatch, capsys):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    with pytest.raises(SystemExit):
        main_of("cifar")([])
    assert "--process-id 3 is not below --num-processes 2" in capsys.readouterr().err
    monkeypatch.setenv("JAX_NUM_PROCESSES", "0")  # a bad variable is named as such, not as a flag never passed
    with pytest.raises(SystemExit) as exit_info:
        main_of("cifar")([])
    assert exit_info.value.code == 2
    assert "$JAX_NUM_PROCESSES '0' must be a positive whole number: unset it or pass --num-processes" in \
        capsys.readouterr().err
