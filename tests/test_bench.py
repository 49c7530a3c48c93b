"""The benchmark's table and the PyTorch references it times fnlearn against (values, never speed)."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import timing, workloads
from benchmarks.__main__ import main as bench_main
from benchmarks.__main__ import print_table
from fnlearn import models
from fnlearn.data import load_dataset
from fnlearn.data.augment import CIFAR10_MEAN, CIFAR10_STD, tta_logits
from fnlearn.recipes.cifar import CifarConfig

FIELDS = {"workload", "mode", "precision", "unit", "torch_per_s", "torch_mode", "fnlearn_per_s", "ratio",
          "paired_ratio", "compile_s", "torch_accuracy", "fnlearn_accuracy"}
# The recipe at a test's size: 96 training images of 4 classes make 6 steps an epoch, 12 in all,
# in calls of 3 steps (one program to compile).
TINY = CifarConfig(model="fastnet_tiny", epochs=2, batch_size=16, eval_batch_size=16, whiten_bias_epochs=1,
                   steps_per_execution=3)


def test_rows_in_the_json(torch, tmp_path):
    path = tmp_path / "bench.json"
    returned = bench_main(["regression", "cnn", "--repeats", "1", "--json", str(path)])
    saved = json.loads(path.read_text())
    rows = saved["rows"]
    assert rows == returned
    assert {"jax", "device", "cpu", "torch", "torch_mode", "cpu_kernels"} <= set(saved["machine"])
    assert saved["machine"]["torch_mode"] == "fastest on a probe"
    assert [(r["workload"], r["mode"], r["precision"]) for r in rows] == [
        ("regression", "jit_step", "fp32"), ("regression", "compiled_run", "fp32"),
        ("cnn", "jit_step", "fp32"), ("cnn", "jit_step", "bf16"),
        ("cnn", "compiled_run", "fp32"), ("cnn", "compiled_run", "bf16")]
    assert [r["torch_mode"] for r in rows[:2]] == ["fp32_eager"] * 2
    assert rows[2]["torch_mode"] in timing.TORCH_MODES and len({r["torch_mode"] for r in rows[2:]}) == 1
    for r in rows:
        assert set(r) == FIELDS
        assert r["torch_per_s"] > 0 and r["fnlearn_per_s"] > 0 and r["compile_s"] > 0
        assert r["ratio"] == pytest.approx(r["fnlearn_per_s"] / r["torch_per_s"], rel=1e-12)
        assert r["paired_ratio"] == pytest.approx(r["ratio"], rel=1e-12)  # one round: the same runs
    assert {r["unit"] for r in rows[:2]} == {"steps/s"} and {r["unit"] for r in rows[2:]} == {"images/s"}
    assert rows[0]["torch_mode"] == "fp32_eager" and rows[2]["torch_mode"] in timing.TORCH_MODES
    # fp16 autocast is probed on CUDA only.
    assert rows[2]["torch_mode"] not in timing.GPU_ONLY_MODES
    assert all(r["torch_accuracy"] is None and r["fnlearn_accuracy"] is None for r in rows)
    # Both fnlearn precisions and modes of a workload are measured against one PyTorch number.
    assert len({r["torch_per_s"] for r in rows[2:]}) == 1


def test_unknown_workload_exits_naming_it(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_main(["regression", "resnet19_train"])
    assert exit_info.value.code != 0
    assert "resnet19_train" in capsys.readouterr().err


def test_torch_mode_holds_the_conv_workloads_pytorch_side_to_one_mode(torch, monkeypatch, capsys):
    if timing.torch_device(torch).type != "cuda":  # there fp16 autocast is a valid mode
        with pytest.raises(SystemExit):
            bench_main(["cnn", "--torch-mode", "fp16_autocast_channels_last"])
        assert "--torch-mode fp16_autocast_channels_last runs on CUDA only" in capsys.readouterr().err
    measured = {}

    def measure(workload, torch, repeats):
        measured[workload.name] = workload.torch_modes
        return []

    monkeypatch.setattr("benchmarks.__main__.measure", measure)
    bench_main(["regression", "cnn", "--torch-mode", "fp32_channels_last"])
    assert measured == {"regression": ("fp32_eager",), "cnn": ("fp32_channels_last",)}  # the basics run fp32 eager


def test_measure_yields_a_row_per_fnlearn_mode_against_one_torch_number(torch):
    small = dataclasses.replace(workloads.basic("simple_net", workloads.simple_net_start, batch=8, steps=4),
                                min_seconds=0.0)
    rows = list(timing.measure(small, torch, repeats=1))
    assert [(r["workload"], r["mode"], r["precision"], r["unit"], r["torch_mode"]) for r in rows] == [
        ("simple_net", "jit_step", "fp32", "steps/s", "fp32_eager"),
        ("simple_net", "compiled_run", "fp32", "steps/s", "fp32_eager")]
    for r in rows:
        assert set(r) == FIELDS
        assert r["ratio"] == pytest.approx(r["fnlearn_per_s"] / r["torch_per_s"], rel=1e-12)
    assert rows[0]["torch_per_s"] == rows[1]["torch_per_s"]


def test_paired_ratio_takes_each_rounds_ratio(torch, monkeypatch):
    # Round 1 meets a slow spell in PyTorch's run (4 s) and not in fnlearn's (2 s); round 2 runs
    # both in 1 s. Best against best is 1.0x; the rounds' own ratios are 2.0x and 1.0x.
    seconds = iter([4.0, 2.0, 1.0, 1.0])
    monkeypatch.setattr(timing, "round_rates", lambda runs, repeats: [
        [items / next(seconds) for _, items in runs] for _ in range(repeats)])
    small = dataclasses.replace(workloads.basic("simple_net", workloads.simple_net_start, batch=8, steps=4),
                                min_seconds=0.0, modes=(("jit_step", 1),))
    (row,) = timing.measure(small, torch, repeats=2)
    assert row["ratio"] == pytest.approx(1.0)
    assert row["paired_ratio"] == pytest.approx(1.5)  # the median of 2.0 and 1.0


def test_timed_run_counts_the_items_it_makes():
    def step():
        return None

    cnn = workloads.WORKLOADS["cnn"]  # 20 steps of 64 images a run
    assert timing.timed_run(cnn, step, 1)[1] == 20 * 64
    assert timing.timed_run(cnn, step, 20)[1] == 20 * 64  # one compiled run of 20 steps
    basic = workloads.basic("simple_net", workloads.simple_net_start, batch=64, steps=4)  # runs last >= 0.1 s
    assert timing.timed_run(basic, step, 1, seconds_per_call=0.5)[1] == 4  # lasts 0.1 s already
    assert timing.timed_run(basic, step, 1, seconds_per_call=0.01)[1] == 10  # 10 calls to last 0.1 s
    assert timing.timed_run(basic, step, 4, seconds_per_call=0.04)[1] == 3 * 4  # 3 calls of 4 steps


def test_a_timed_run_starts_its_clock_after_one_untimed_call(monkeypatch):
    now = [0]  # a fake clock: each step takes one tick

    def step():
        now[0] += 1

    monkeypatch.setattr(timing.time, "perf_counter", lambda: now[0])
    time_run, items = timing.timed_run(workloads.WORKLOADS["cnn"], step, 1)
    assert (time_run(), now[0], items) == (20, 21, 20 * 64)
    # A whole run starts cold, as a user's does.
    now[0] = 0
    time_run, _ = timing.timed_run(workloads.cifar_run(TINY, fraction=None), step, 1)
    assert (time_run(), now[0]) == (1, 1)


def test_workload_table():
    for w in workloads.WORKLOADS.values():
        assert set(w.precisions) <= set(timing.PRECISIONS) and set(w.torch_modes) <= set(timing.TORCH_AUTOCAST)
    with pytest.raises(ValueError, match="simple_net: 4 steps"):  # its compiled run makes 200 a call
        dataclasses.replace(workloads.WORKLOADS["simple_net"], steps=4)
    assert all(name in workloads.WORKLOADS for group in workloads.GROUPS.values() for name in group)
    # fastnet_epoch times whole recipe calls (4 steps each) of its 50,000 // 1024 = 48 steps, at least one.
    assert workloads.WORKLOADS["fastnet_epoch"].modes == (("recipe_epoch", 4),)
    assert [workloads.fastnet_epoch(f).steps for f in (0.001, 0.08, 0.5, 1.0)] == [4, 4, 24, 48]
    # cifar_run: one run a step, of ceil(48 * 9.9) = 476 steps of 1024 images; on a CPU, the epoch fraction's.
    assert workloads.cifar_run(fraction=None).batch == 476 * 1024
    assert workloads.WORKLOADS["cifar_run"].batch == 4 * 1024 and workloads.WORKLOADS["cifar_run"].steps == 1
    assert workloads.WORKLOADS["cifar_run"].accuracy and not workloads.WORKLOADS["fastnet_epoch"].accuracy


def test_torch_device_is_the_cpu_here(torch):
    assert jax.default_backend() == "cpu"
    assert timing.torch_device(torch) == torch.device("cpu")
    assert timing.torch_finish(torch) is jax.block_until_ready  # no CUDA work to wait for


def test_torch_tta_is_fnlearns(torch):
    from benchmarks.torch_models import tta_logits as torch_tta_logits

    rng = np.random.default_rng(0)
    images = rng.standard_normal((3, 6, 6, 3)).astype(np.float32)  # (B, H, W, C)
    weights = rng.standard_normal((6 * 6 * 3, 5)).astype(np.float32)  # a linear "net": no view looks alike

    def net(x):  # (N, 3, H, W) -> (N, 5), on the NHWC layout fnlearn's gets
        return x.permute(0, 2, 3, 1).reshape(len(x), -1) @ torch.from_numpy(weights)

    for translate in (1, 0):
        got = torch_tta_logits(net, torch.from_numpy(images).permute(0, 3, 1, 2), translate=translate)
        expected = tta_logits(lambda x: x.reshape(len(x), -1) @ weights, jnp.asarray(images), translate)
        np.testing.assert_allclose(got.numpy(), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_cifar_run_trains_and_evaluates_both_sides(torch, tmp_path, capsys, write_tree):
    dataset = load_dataset(write_tree(tmp_path / "src"), data_dir=tmp_path / "tfds")
    run = workloads.cifar_run(TINY, fraction=None, dataset=dataset)
    assert run.batch == 12 * 16  # a run's images: 2 epochs of 6 steps of 16
    # fp32 only: each precision and PyTorch mode costs a compile or a kernel warm-up of seconds.
    run = dataclasses.replace(run, precisions=("fp32",), torch_modes=("fp32_channels_last",))
    rows = list(timing.measure(run, torch, repeats=2))
    assert [(r["workload"], r["mode"], r["precision"]) for r in rows] == [("cifar_run", "recipe_run", "fp32")]
    (row,) = rows
    assert set(row) == FIELDS and row["unit"] == "images/s"
    assert row["torch_per_s"] > 0 and row["fnlearn_per_s"] > 0 and row["compile_s"] > 0
    # The mean over 2 runs of 32 test images: a multiple of 1/64.
    for accuracy in (row["torch_accuracy"], row["fnlearn_accuracy"]):
        assert isinstance(accuracy, float) and 0 <= accuracy <= 1
        assert accuracy * 64 == pytest.approx(round(accuracy * 64))
    print_table(rows)
    last_line = capsys.readouterr().out.splitlines()[-1]
    assert last_line.split()[-2:] == [f"{row['torch_accuracy']:.4f}", f"{row['fnlearn_accuracy']:.4f}"]


@pytest.mark.slow
def test_cifar_run_cut_short_or_on_random_data_reports_no_accuracy(torch):
    # On random data (50,000 images), a CPU's epoch fraction: one call of 3 steps, no TTA pass.
    # PyTorch in bf16 autocast here, float32 in the test above.
    run = dataclasses.replace(workloads.cifar_run(TINY, fraction=0.001), precisions=("fp32",),
                              torch_modes=("bf16_autocast_channels_last",))
    assert run.batch == 3 * 16
    (row,) = timing.measure(run, torch, repeats=1)
    assert row["torch_accuracy"] == row["fnlearn_accuracy"] == "part run"
    assert timing.mean_accuracy([0.5, 0.75]) == 0.625
    assert timing.mean_accuracy(["random data", "random data"]) == "random data"


def test_missing_data_is_named_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_main(["cifar_run", "--data", str(tmp_path / "no_such_folder")])
    assert exit_info.value.code == 2
    assert "--data" in capsys.readouterr().err


def test_airbench_batch_normalises_flips_and_translates(torch):
    from benchmarks.torch_models import airbench_batch

    images = torch.randint(0, 256, (6, 8, 8, 3), dtype=torch.uint8)
    indices = torch.tensor([4, 1, 2])
    flip_base = torch.tensor([True, False, True, False, False, True])
    plain = airbench_batch(images, indices, torch.zeros(6, dtype=torch.bool), 0, translate=0)
    assert plain.shape == (3, 3, 8, 8) and plain.is_contiguous(memory_format=torch.channels_last)
    mean, std = torch.tensor((CIFAR10_MEAN, CIFAR10_STD)).view(2, 1, 3, 1, 1)
    expected = (images[indices].permute(0, 3, 1, 2) / 255 - mean) / std
    torch.testing.assert_close(plain, expected)
    # Image 2 flips on even epochs (its base is True), images 4 and 1 on odd ones.
    even = airbench_batch(images, indices, flip_base, 0, translate=0)
    odd = airbench_batch(images, indices, flip_base, 1, translate=0)
    torch.testing.assert_close(even, torch.stack([plain[0], plain[1], plain[2].flip(2)]))
    torch.testing.assert_close(odd, torch.stack([plain[0].flip(2), plain[1].flip(2), plain[2]]))
    # A translate is a crop of the reflect-padded image at the drawn offset.
    torch.manual_seed(0)
    shifted = airbench_batch(images, indices, torch.zeros(6, dtype=torch.bool), 0, translate=2)
    torch.manual_seed(0)
    starts = torch.randint(0, 5, (3, 2))  # the draw airbench_batch made
    padded = torch.nn.functional.pad(plain, (2, 2, 2, 2), mode="reflect")
    for image, source, (top, left) in zip(shifted, padded, starts.tolist()):
        torch.testing.assert_close(image, source[:, top:top + 8, left:left + 8])
    assert not torch.equal(shifted, plain)


def test_lookahead_pulls_the_average_and_resets_the_weights(torch):
    from benchmarks.torch_models import lookahead_

    net = torch.nn.BatchNorm1d(2)  # params and running statistics, as lookahead averages both
    with torch.no_grad():
        net.weight.fill_(3.0)
        net.running_mean.fill_(1.0)
    average = [torch.ones(2), torch.zeros(2), torch.zeros(2), torch.ones(2)]  # weight, bias, mean, var
    lookahead_(average, net, decay=0.25)
    # average = 0.25 * average + 0.75 * weights, and the weights take it.
    torch.testing.assert_close(net.weight.detach(), torch.full((2,), 0.25 + 0.75 * 3.0))
    torch.testing.assert_close(net.running_mean, torch.full((2,), 0.75))
    torch.testing.assert_close(average[0], net.weight.detach())
    torch.testing.assert_close(net.running_var, torch.ones(2))


@pytest.mark.parametrize("steps_per_call, precision", [(1, "fp32"), (2, "bf16")])
def test_profile_splits_both_steps_by_kind(torch, steps_per_call, precision, capsys, monkeypatch):
    from benchmarks import profile

    autocasts, workload = [], profile.WORKLOADS["fastnet_train"]

    def torch_step(torch, start, autocast):
        autocasts.append(autocast)
        return workload.torch_step(torch, start, autocast)

    monkeypatch.setitem(profile.WORKLOADS, "fastnet_train", dataclasses.replace(workload, torch_step=torch_step))
    table = profile.main(["fastnet", "--batch", "4", "--steps", "1", "--steps-per-call", str(steps_per_call),
                          "--precision", precision])
    assert f"batch 4, {precision}" in capsys.readouterr().out
    assert autocasts == [{"fp32": None, "bf16": "bfloat16"}[precision]]  # PyTorch's side in the same precision
    assert set(table) == set(profile.KINDS)
    for kind in ("conv forward", "conv backward", "batch norm", "other model ops"):
        torch_ms, fnlearn_ms = table[kind]
        assert torch_ms > 0 and fnlearn_ms > 0, kind
    assert table["optimizer"][1] > 0


def test_profile_kinds_and_interval_union():
    from benchmarks import profile

    assert profile.union_ms([(0, 2_000_000), (1_000_000, 3_000_000), (5_000_000, 6_000_000)]) == 4.0
    hlo = """
%fused_computation.7 (param_0.1: bf16[4,3]) -> bf16[4,2] {
  %param_0.1 = bf16[4,3]{1,0} parameter(0)
  %convert.2 = f32[4,3]{1,0} convert(%param_0.1)
  %slice.1 = f32[4,2]{1,0} slice(%convert.2), slice={[0:4], [0:2]}, metadata={op_name="jit(f)/jvp(FastNet)/slice"}
  ROOT %convert.3 = bf16[4,2]{1,0} convert(%slice.1)
}

ENTRY %main.9 (Arg_0.1: f32[784,128]) -> f32[784,128] {
  %dot.6 = f32[784,128]{1,0} dot(%a, %b), lhs_contracting_dims={0}, metadata={op_name="jit(f)/transpose"}
  %iota_reduce_fusion = (f32[64]{0}, s32[64]{0}) fusion(%dot.7), kind=kLoop, metadata={op_name="jit(f)/reduce"}
  %slice_convert_fusion = bf16[4,2]{1,0} fusion(%p), kind=kLoop, calls=%fused_computation.7
  ROOT %while.1 = (s32[], /*index=1*/(f32[2]{0}, s32[])) while(%tuple.3), condition=%cond, body=%body
}"""
    assert profile.hlo_ops(hlo) == {"dot.6": ("dot", "jit(f)/transpose"),
                                    "iota_reduce_fusion": ("fusion", "jit(f)/reduce"),
                                    # A fusion without metadata: its fused computation's.
                                    "slice_convert_fusion": ("fusion", "jit(f)/jvp(FastNet)/slice"),
                                    "while.1": ("while", ""),
                                    "param_0.1": ("parameter", ""), "convert.2": ("convert", ""),
                                    "slice.1": ("slice", "jit(f)/jvp(FastNet)/slice"), "convert.3": ("convert", "")}
    # Only the ops inside a compiled run count: its `while` spans them all.
    spans = {"dot.6": [(1, 2)], "iota_reduce_fusion": [(2, 3)], "while.1": [(0, 4)], "unknown.1": [(0, 1)]}
    assert profile.inner_ops(spans, profile.hlo_ops(hlo)) == {"dot.6": [(1, 2)], "iota_reduce_fusion": [(2, 3)]}
    kind = profile.jax_kind
    assert kind("conv_general_dilated.3", "convolution", "jit(f)/jvp(FastNet)/block1/conv1/conv", "FastNet") \
        == "conv forward"
    assert kind("convolution.7", "convolution", "", "FastNet") == "conv backward"
    onednn = "jit(f)/transpose(jvp(FastNet))/block1/conv1/cond/branch_0_fun/fnlearn_onednn_kernel_grad"
    assert kind("fnlearn_onednn_kernel_grad.1", "custom-call", onednn, "FastNet") == "conv backward"
    assert kind("fnlearn_onednn_forward.2", "custom-call", "jit(f)/jvp(FastNet)/block1/conv1/cond", "FastNet") \
        == "conv forward"
    one_by_one = "jit(f)/transpose(jvp(ResNet))/layer2_0/downsample_conv/cond/branch_0_fun/dot_general"
    assert kind("dot.2", "dot", one_by_one, "ResNet") == "conv backward"
    assert kind("dot.3", "dot", "jit(f)/jvp(ResNet)/fc/dot_general", "ResNet") == "other model ops"
    assert kind("transpose_copy_fusion.4", "fusion", "", "FastNet") == "layout copies"
    assert kind("add_fusion", "fusion", "jit(f)/jvp(ResNet)/layer1_0/downsample_bn/add", "ResNet") == "batch norm"
    assert kind("erf_fusion", "fusion", "jit(f)/jvp(FastNet)/block2/erf", "FastNet") == "other model ops"
    assert kind("multiply_fusion", "fusion", "jit(f)/mul", "FastNet") == "optimizer"
    assert kind("slice_convert_fusion.14", "fusion", "", "FastNet") == "unattributed"  # no metadata: not the update's
    assert profile.torch_kind("aten::convolution_backward") == "conv backward"
    assert profile.torch_kind("aten::mkldnn_convolution") == "conv forward"
    assert profile.torch_kind("aten::native_batch_norm") == "batch norm"


@pytest.mark.parametrize("change", [{"optimizer": "muon"}, {"flip": "random"}, {"clip_norm": 1.0},
                                    {"accumulate": 2}, {"model": "resnet_tiny"}])
def test_cifar_run_refuses_what_its_pytorch_side_does_not_port(change):
    with pytest.raises(ValueError, match="ports airbench94's recipe only"):
        workloads.cifar_run(dataclasses.replace(TINY, **change))


def test_the_pytorch_twin_holds_every_weight_but_frozen_ones(torch, monkeypatch):
    from benchmarks import torch_models

    variables = models.get("fastnet_tiny").init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    torch_models.twin("fastnet_tiny", variables)  # its frozen BatchNorm weights keep torch's init
    make_net, to_state_dict = torch_models.TWINS["fastnet_tiny"]
    state = to_state_dict(variables)
    trainable = next(k for k in state if k.endswith("conv1.weight"))
    for changed, message in [({**state, "extra.weight": torch.zeros(1)}, "unexpected"),
                             ({k: v for k, v in state.items() if k != trainable}, trainable)]:
        monkeypatch.setitem(torch_models.TWINS, "fastnet_tiny", (make_net, lambda _, changed=changed: changed))
        with pytest.raises(KeyError, match=message):
            torch_models.twin("fastnet_tiny", variables)
