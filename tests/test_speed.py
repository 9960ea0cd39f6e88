"""The speed kit: the fast CIFAR net, per-sample crops, the compile option, the CIFAR benchmark's FLOPs and methods,
and the GPU's precision, layout and compiled graphs, simulated on the CPU so that CI runs the CUDA code paths."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

import unlearnkit.train
from unlearnkit.benchmarking import record_header
from unlearnkit.data import ImageDataset, random_split
from unlearnkit.methods import METHODS, mimu, unlearn
from unlearnkit.models import build_model, model_for, whiten_stem
from unlearnkit.train import Recipe, _cache_key, fit, flip_crop, grad_scaler, train_model


def _tiny_cifar(n: int = 96, n_train: int | None = None) -> ImageDataset:
    """Random CIFAR-shaped images whose label is written into their brightness, so there is something to learn;
    the first ``n_train`` (default all) are the training pool, the rest the test set."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (n,), generator=generator)
    images = torch.randint(0, 64, (n, 3, 32, 32), dtype=torch.uint8, generator=generator)
    images = images + (labels * 60).view(-1, 1, 1, 1).to(torch.uint8)
    return ImageDataset("tiny", images, labels, n_train or n, ("a", "b", "c", "d"), (0.5,) * 3, (0.3,) * 3)


def test_fastnet_trains_on_the_cpu_and_its_loss_goes_down():
    data = _tiny_cifar()
    model = model_for(data, "fastnet", seed=0, widths=(16, 32, 32))
    recipe = Recipe(epochs=6, batch_size=32, lr=0.05, label_smoothing=0.2, augment="flip-crop")
    log = train_model(model, data, data.train_pool, recipe, progress=False)
    assert log.epoch_losses[-1] < 0.8 * log.epoch_losses[0], log.epoch_losses
    assert model.head.in_features == 32 and model.features(data.images[:2]).shape == (2, 32)


def test_whitened_stem_decorrelates_patches_and_stays_frozen():
    data = _tiny_cifar()
    model = whiten_stem(model_for(data, "fastnet", seed=0, widths=(8, 8, 8)), data.images)
    stem = model.backbone[1]
    assert not stem.weight.requires_grad
    out = stem(model.backbone[0](data.images))[:, :12]  # the positive half: one filter per eigenvector
    covariance = torch.cov(out.permute(1, 0, 2, 3).reshape(12, -1))
    torch.testing.assert_close(covariance, torch.eye(12), atol=0.05, rtol=0)
    with pytest.raises(ValueError, match="needs a 'fastnet'"):
        whiten_stem(model_for(data, "mlp"), data.images)


def test_per_sample_crops_shift_each_image_on_its_own():
    x = torch.arange(1, 1 + 64 * 16, dtype=torch.float32).view(64, 1, 4, 4)
    y = flip_crop(x, torch.Generator().manual_seed(0), pad=1)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    shifts = set()
    for i in range(len(x)):
        found = [(dy, dx) for dy in range(3) for dx in range(3) for img in (padded[i], padded[i].flip(-1))
                 if torch.equal(img[:, dy:dy + 4, dx:dx + 4], y[i])]
        assert found, f"image {i} is not a flipped or unflipped crop of its padded input"
        shifts.add(found[0])
    assert len(shifts) > 3  # one shift per batch would give a single one
    torch.testing.assert_close(flip_crop(x, torch.Generator().manual_seed(0), pad=1), y)


def test_the_compile_option_is_accepted_and_skipped_on_the_cpu_with_a_warning():
    data = _tiny_cifar(32)
    model = model_for(data, "mlp", seed=0)
    with pytest.warns(UserWarning, match="only used on CUDA"):
        log = train_model(model, data, data.train_pool, Recipe(epochs=1, batch_size=16, compile=True), progress=False)
    assert len(log.epoch_losses) == 1
    # compiling changes speed, not the model, so it shares the cache entry of the eager recipe
    assert _cache_key(model, data, data.train_pool, Recipe(compile=True), 0) == \
        _cache_key(model, data, data.train_pool, Recipe(), 0)


@pytest.mark.parametrize("arch", ["fastnet", "resnet18"])
def test_the_benchmark_counts_positive_training_flops(arch, benchmark_script):
    bench = benchmark_script("bench_cifar")
    flops = bench.train_flops_per_image(arch)
    assert flops > 0
    if arch == "resnet18":  # 0.56 G multiply-adds forward = 1.1 GFLOP; backward twice that: about 3.3 GFLOP
        assert 2.8e9 < flops < 3.8e9, flops
    assert bench.peak_flops(torch.device("cpu")) is None


def test_fastnet_is_much_cheaper_than_resnet18(benchmark_script):
    bench = benchmark_script("bench_cifar")
    assert bench.train_flops_per_image("fastnet") < 0.5 * bench.train_flops_per_image("resnet18")
    model = build_model("fastnet", (3, 32, 32), 10, (0.5,) * 3, (0.25,) * 3)
    assert sum(p.numel() for p in model.parameters()) < 3_000_000


def test_the_benchmark_times_registered_methods_and_keeps_one_off_work_apart(benchmark_script):
    bench = benchmark_script("bench_cifar")
    assert "retrain" not in bench.UNLEARNING_METHODS and {"sisa", "mimu", "ga"} <= set(bench.UNLEARNING_METHODS)
    data = _tiny_cifar(80, n_train=64)
    split = random_split(data, 0.1, seed=0)
    recipe = Recipe(epochs=1, batch_size=16)
    original, _ = fit(data, split.train, recipe, arch="mlp", seed=0, cache=False, progress=False)
    timed = bench.time_methods(original, data, split, recipe, ["ga", "sisa", "mimu", "no such method"],
                               oracle_seconds=1.0)
    for name in ("ga", "sisa", "mimu"):
        assert timed[name]["seconds"] > 0 and timed[name]["speedup_vs_oracle"] == 1.0 / timed[name]["seconds"]
    assert timed["sisa"]["one_off_seconds"] > 0 and timed["mimu"]["one_off_seconds"] > 0
    assert "one_off_seconds" not in timed["ga"]
    assert timed["no such method"]["seconds"] is None and "KeyError" in timed["no such method"]["error"]


def test_the_benchmark_records_test_accuracy_on_real_cifar10_only(benchmark_script):
    import argparse

    bench = benchmark_script("bench_cifar")
    args = argparse.Namespace(tiny=True, epochs=1, compile=False, repeats=1, skip_oracle=False, methods=[],
                              batch_size=None, profile=False)
    shaped = _tiny_cifar(80, n_train=64)
    record = bench.bench_arch("fastnet", shaped, args, peak=None)
    assert record["oracle_s"] > 0 and "oracle_test_acc" not in record  # random pixels: accuracy means nothing
    real = ImageDataset("cifar10", shaped.images, shaped.labels, 64, shaped.classes, shaped.mean, shaped.std)
    record = bench.bench_arch("fastnet", real, args, peak=None)
    for name in ("original", "oracle"):
        assert 0 <= record[f"{name}_test_acc"] <= 1 and 0 <= record[f"{name}_test_acc_flip_tta"] <= 1
    header = record_header("cifar", torch.device("cpu"))
    table = bench.markdown(header | {"real": True, "note": "n", "results": [record]})
    assert "test acc" in table and "with flips" in table


def test_the_benchmark_profiles_an_epoch_at_the_batch_size_asked_for(benchmark_script, tmp_path):
    import argparse

    bench = benchmark_script("bench_cifar")
    args = argparse.Namespace(tiny=True, epochs=1, compile=False, repeats=1, skip_oracle=True, methods=[],
                              batch_size=8, profile=True, results=tmp_path)
    record = bench.bench_arch("fastnet", _tiny_cifar(40), args, peak=None)
    assert record["recipe"]["batch_size"] == 8 and record["steps_per_epoch"] == 5
    table = (tmp_path / "cifar_profile_fastnet_cpu.txt").read_text()
    assert "batch 8" in table and "aten::convolution" in table  # the epoch's convolutions were recorded


def test_a_partial_benchmark_run_never_replaces_the_full_record(benchmark_script):
    """An epochs-only CIFAR run once replaced the record of every method's seconds on the GPU machine (by name);
    partial and full-mode runs are written under names of their own."""
    import argparse

    cifar = benchmark_script("bench_cifar")
    plain = argparse.Namespace(real=False, compile=False, batch_size=None, skip_oracle=False)
    assert cifar.record_name(plain) == "cifar"
    assert cifar.record_name(argparse.Namespace(**{**vars(plain), "skip_oracle": True})) == "cifar_epochs"
    assert cifar.record_name(argparse.Namespace(real=True, compile=True, batch_size=512, skip_oracle=True)) \
        == "cifar_real_compile_bs512_epochs"
    training = benchmark_script("bench_training")
    assert [training.record_name(mode) for mode in ("quick", "full", "both")] == \
        ["training", "training_full", "training_both"]


def test_cudnn_autotunes_the_epoch_timing_only(benchmark_script, monkeypatch):
    """Autotuning makes each new input shape pay seconds of kernel timing (measured on an H100), which must
    not land in a one-off request's seconds: only the fixed-shape epoch timing, after a warm-up, uses it."""
    bench = benchmark_script("bench_cifar")
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    with bench.cudnn_autotuning(torch.device("cuda")):
        assert torch.backends.cudnn.benchmark is True
    with bench.cudnn_autotuning(torch.device("cpu")):
        assert torch.backends.cudnn.benchmark is False
    assert torch.backends.cudnn.benchmark is False  # restored for the models and methods that follow
    seen = []
    monkeypatch.setattr(bench, "cudnn_autotuning", lambda device: seen.append(device) or contextlib.nullcontext())
    data = _tiny_cifar(40)
    bench.time_epochs("fastnet", data, Recipe(epochs=1, batch_size=16), repeats=1)
    assert seen == [data.device]
    header = record_header("cifar", torch.device("cpu"))
    gpu_runs = header | {"device_type": "cuda", "real": False, "note": "n", "results": [
        {"arch": "fastnet", "n_train": 1, "epoch_s_median": 1.0, "images_per_s": 1.0, "train_gflop_per_image": 1.0,
         "achieved_tflops": 1.0, "fraction_of_bf16_peak": 0.1, "gpu_waits_per_epoch": 0, "steps_per_epoch": 1,
         "methods": {"ga": {"seconds": 1.0, "speedup_vs_oracle": 1.0}}}]}
    assert "on for every run" in bench.markdown(gpu_runs)  # a record from before the fix says what it includes
    assert "ran without it" in bench.markdown(gpu_runs | {"cudnn_autotuning": "epochs"})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16 (H100, A100)", "fp16 (T4)"])
def test_lesson_00s_loop_with_autocast_and_the_scaler_is_the_kits_loop_in_a_gpus_precision(dtype, monkeypatch):
    """Lesson 00 rebuilds the training loop from scratch and checks it against ``train_model`` on a GPU too. In
    a GPU's precision the two only agree if the from-scratch loop also uses the kit's ``autocast`` and, for fp16,
    its loss scaler (which skips the first steps, whose scaled gradients overflow): on an H100 without
    ``autocast`` 2.3 to 2.5% of the lesson's test predictions differed; in simulated fp16 without the scaler,
    up to 4.4%."""
    monkeypatch.setattr(unlearnkit.train, "autocast_dtype", lambda device: dtype)
    data = _tiny_cifar(120, n_train=96)
    indices = torch.arange(96)
    kits = model_for(data, "mlp", seed=0)
    train_model(kits, data, indices, Recipe(epochs=2, batch_size=16, lr=0.05, schedule="constant"), seed=0,
                progress=False)
    ours = model_for(data, "mlp", seed=0)
    optimizer = torch.optim.SGD(ours.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    scaler = grad_scaler(data.device)
    generator = torch.Generator().manual_seed(0)
    ours.train()
    for _ in range(2):  # the loop of lesson 00, cell "train_from_scratch"
        order = torch.randperm(len(indices), generator=generator)
        for start in range(0, len(order), 16):
            batch = indices[order[start:start + 16]]
            with unlearnkit.train.autocast(data.device):
                loss = F.cross_entropy(ours(data.images[batch]), data.labels[batch])
            optimizer.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
    for name, tensor in ours.state_dict().items():
        torch.testing.assert_close(tensor, kits.state_dict()[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16 (H100, A100)", "fp16 (T4)"])
def test_every_method_runs_in_a_gpus_precision_and_layout(dtype, monkeypatch):
    """The kit's CUDA policy (autocast, loss scaling for fp16, channels_last), switched on for the CPU.

    CI has no GPU, so this is where a dtype mismatch or a ``view`` of a channels_last weight would
    show up before a learner's Colab T4 or an H100 run meets it.
    """
    monkeypatch.setattr(unlearnkit.train, "autocast_dtype", lambda device: dtype)
    monkeypatch.setattr(unlearnkit.train, "memory_format", lambda device: torch.channels_last)
    assert grad_scaler(torch.device("cpu")).is_enabled() == (dtype == torch.float16)
    data = _tiny_cifar(120, n_train=96)
    split = random_split(data, 0.1, seed=0)
    recipe = Recipe(epochs=2, batch_size=32, lr=0.05)
    model = model_for(data, "fastnet", seed=0, widths=(8, 16, 16))
    seen = []
    hook = model.backbone[2].register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    train_model(model, data, split.train, recipe, progress=False)
    hook.remove()
    assert set(seen) == {dtype}, f"the training loop computed in {set(seen)}, not {dtype}"
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters() if p.ndim == 4)
    hyper = {"retrain": {"recipe": recipe, "cache": False}, "sisa": {"recipe": recipe, "progress": False},
             "mimu": {"controller": mimu.train_controller(model, data, split.train, seed=0, progress=False),
                      "progress": False}}
    for name in METHODS:
        result = unlearn(name, model, data, split, **hyper.get(name, {}))
        with torch.no_grad():
            logits = result.model(data.images[split.test])
        assert logits.dtype == torch.float32 and torch.isfinite(logits).all(), name


@pytest.mark.parametrize("arch", ["mlp", "cnn", "resnet18", "fastnet"])
def test_every_architecture_compiles_to_one_graph(arch):
    """``Recipe(compile=True)`` on CUDA: a graph break would silently cost speed, so trace with fullgraph."""
    model = build_model(arch, (3, 32, 32), 10, (0.5,) * 3, (0.25,) * 3, seed=0).train()
    x, y = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (4,))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # tracing only: no C++ compiler needed
    loss = F.cross_entropy(compiled(x), y)
    loss.backward()
    torch.testing.assert_close(loss, F.cross_entropy(model(x), y))
