"""The pretraining engine: checkpoints, exact resume, Stop, transfer into fine-tuning, DDP, bad input."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from ssl_support import tiny_model
from volume_factory import save_nifti, synthetic_volume

from kaf.app.workflow import prepare_for_training
from kaf.data.annotation import sparse_annotation
from kaf.data.keypoints import KeypointConfig
from kaf.data.volume_io import Volume
from kaf.jobs.events import CancelToken, drive
from kaf.jobs.finetune import FinetuneSettings, Initialisation, build_model, finetune
from kaf.jobs.pretrain import (
    PretrainNetwork,
    PretrainSettings,
    _train_step,
    _wrap,
    make_optimiser,
    pretrain,
    read_resume_point,
    with_resume_defaults,
)
from kaf.models import KafUNet
from kaf.models.checkpoints import load_checkpoint
from kaf.runtime.errors import CheckpointError, InputDataError, JobCancelled
from kaf.ssl import make_method
from kaf.ssl.base import Communicator, OptimiserSettings, item_generators, to_device
from kaf.ssl.data import load_pretrain_data, volumes_from_arrays

TINY = tiny_model(kaf=True).config


def _data(volumes: int = 2):
    return volumes_from_arrays([synthetic_volume(seed=i)[0] for i in range(volumes)], TINY.max_keypoints)


def _settings(**changes) -> PretrainSettings:
    values = dict(method="kaf", steps=4, batch_size=2, view_size=32, save_every=2, learning_rate=0.01)
    values.update(changes)
    return PretrainSettings(**values)


def _run(data, settings, out, resume=None, cancel=None, on_event=None):
    return drive(pretrain(data, settings, out, resume, cancel, model_config=TINY), on_event)


def test_checkpoint_holds_backbone_heads_optimiser_and_progress(tmp_path):
    out = tmp_path / "kaf.safetensors"
    result = _run(_data(), _settings(), out)
    state, metadata = load_checkpoint(out)
    assert result.steps == 4 and metadata.method == "kaf" and metadata.steps == 4
    assert metadata.extra["transfer"] == ["encoder", "bottleneck"]
    assert metadata.data_fingerprint == _data().fingerprint()
    assert any(name.startswith("encoder.0.kaf.") for name in state)
    assert any(name.startswith("ssl_heads.matcher.") for name in state)
    assert any(name.startswith("optimiser.") and name.endswith(".exp_avg") for name in state)  # Adam: ours
    assert set(result.last_terms) == {"L_PCL", "L_global", "L_local"}


def test_optimiser_setting_replaces_the_methods_and_a_resume_keeps_it(tmp_path):
    out = tmp_path / "kaf.safetensors"
    _run(_data(), _settings(optimiser="sgd", steps=2), out)
    state, _ = load_checkpoint(out)
    assert any(name.startswith("optimiser.") and name.endswith(".momentum_buffer") for name in state)
    assert not any(name.endswith(".exp_avg") for name in state)
    resume = read_resume_point(out, "kaf", TINY)
    assert with_resume_defaults(_settings(steps=4, optimiser=None), resume).optimiser == "sgd"
    with pytest.raises(InputDataError, match="optimiser"):
        _settings(optimiser="rmsprop")


def test_resume_continues_exactly(tmp_path):
    data = _data()
    straight = tmp_path / "straight.safetensors"
    _run(data, _settings(), straight)
    halfway = tmp_path / "halfway.safetensors"
    cancel = CancelToken()

    def stop_after_two(event):
        if event.step == 2 and event.loss is not None:
            cancel.cancel()

    with pytest.raises(JobCancelled, match="last complete save"):
        _run(data, _settings(), halfway, cancel=cancel, on_event=stop_after_two)
    resume = read_resume_point(halfway, "kaf", TINY)
    assert resume.step == 2
    result = _run(data, _settings(), halfway, resume=resume)
    assert result.steps == 2
    expected, _ = load_checkpoint(straight)
    resumed, _ = load_checkpoint(halfway)
    assert set(expected) == set(resumed)
    for name, tensor in expected.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_a_finished_run_resumes_only_to_train_its_last_stage_longer(tmp_path):
    out = tmp_path / "gcl.safetensors"
    data = _data()
    _run(data, _settings(method="gcl", steps=1), out)
    finished = read_resume_point(out, "gcl", TINY)
    assert (finished.stage, finished.step) == (1, 1)
    with pytest.raises(InputDataError, match="nothing is left to resume"):
        _run(data, _settings(method="gcl", steps=1), out, resume=finished)

    stages = []
    result = _run(data, _settings(method="gcl", steps=3), out, resume=finished, on_event=stages.append)
    assert result.steps == 2
    assert {event.stage for event in stages if event.loss is not None} == {"pretrain gcl (local)"}
    _, metadata = load_checkpoint(out)
    assert metadata.steps == 6 and metadata.extra["pretrain"]["stage_step"] == 3


def test_stop_keeps_the_last_complete_checkpoint(tmp_path):
    out = tmp_path / "kaf.safetensors"
    cancel = CancelToken()

    def stop_at_three(event):
        if event.step == 3 and event.loss is not None:
            cancel.cancel()

    with pytest.raises(JobCancelled):
        _run(_data(), _settings(), out, cancel=cancel, on_event=stop_at_three)
    _, metadata = load_checkpoint(out)
    assert metadata.steps == 2
    assert [p.name for p in tmp_path.iterdir()] == ["kaf.safetensors"]  # no temporary file left


def test_resume_refuses_another_method_or_backbone(tmp_path):
    out = tmp_path / "kaf.safetensors"
    _run(_data(), _settings(steps=1), out)
    with pytest.raises(CheckpointError, match="method 'kaf', not 'gcl'"):
        read_resume_point(out, "gcl", TINY)
    with pytest.raises(CheckpointError, match="another preset or backbone"):
        read_resume_point(out, "kaf", tiny_model(kaf=False).config)


def test_pretrained_encoder_is_transferred_and_the_decoder_left_as_initialised(tmp_path):
    out = tmp_path / "kaf.safetensors"
    _run(_data(), _settings(steps=2), out)
    state, metadata = load_checkpoint(out)
    init = Initialisation(state, metadata, str(out))
    config = TINY.with_classes(3)
    torch.manual_seed(0)
    fresh = KafUNet(config).state_dict()
    torch.manual_seed(0)
    model, report = build_model(config, init)
    assert report.summary().startswith("loaded") and "decoder" in report.summary()
    changed = 0
    for name, tensor in model.state_dict().items():
        if name.startswith(("encoder", "bottleneck")):
            torch.testing.assert_close(tensor, state[name], rtol=0, atol=0, msg=name)
            changed += not torch.equal(tensor, fresh[name])
        else:
            torch.testing.assert_close(tensor, fresh[name], rtol=0, atol=0, msg=name)
    assert changed > 20

    image, labels = synthetic_volume()
    sparse = np.zeros_like(labels)
    sparse[[2, 5]] = labels[[2, 5]]
    prepared = prepare_for_training(Volume(image, np.eye(4)), "interactive", max_side=0)
    result = drive(
        finetune(prepared, sparse_annotation(sparse, 0), FinetuneSettings(preset="custom", steps=2), init)
    )
    assert result.metadata.extra["pretrained_from"] == "kaf" and len(result.losses) == 2


def test_empty_folder_unreadable_and_too_small_volumes(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    keypoints = KeypointConfig(max_keypoints=32)
    with pytest.raises(InputDataError, match="holds no volume"):
        load_pretrain_data([empty], 128, 16, keypoints)
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    save_nifti(synthetic_volume()[0], folder / "good.nii.gz")
    save_nifti(np.zeros((4, 8, 8), np.float32) + np.arange(8, dtype=np.float32), folder / "tiny.nii.gz")
    data = load_pretrain_data([folder], 128, 16, keypoints)
    assert [volume.name for volume in data.volumes] == ["good.nii.gz"]
    assert any(message.startswith(str(folder / "broken.nii.gz")) for message in data.skipped)
    assert any("tiny.nii.gz" in message and "smaller --view-size" in message for message in data.skipped)
    (folder / "good.nii.gz").unlink()
    with pytest.raises(InputDataError, match="no usable volume") as error:
        load_pretrain_data([folder], 128, 16, keypoints)
    assert "broken.nii.gz" in str(error.value) and "tiny.nii.gz" in str(error.value)


# --- DDP: two gloo processes with B items each make the same update as one process with 2B -------------


def _one_step(rank: int, world_size: int, items: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    comm = Communicator()
    if world_size > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
        comm = Communicator(rank, world_size)
    method = make_method("kaf", view_size=32)
    model = tiny_model(kaf=True, seed=0)
    torch.manual_seed(1)
    heads = method.build_heads(model)
    network = PretrainNetwork(model, heads, method, comm)
    # CPU has no SyncBatchNorm: per-rank batch statistics would differ from the whole batch's, so the
    # comparison runs with BatchNorm on its running statistics and isolates gradients and negatives.
    network.eval()
    settings = OptimiserSettings(kind="sgd", learning_rate=0.1, momentum=0.0)
    optimiser = make_optimiser(list(network.parameters()), settings, 0.1)
    local = items // world_size
    batch = method.make_batch(_data(), item_generators(0, 0, rank * local, local), "pretrain", True)
    wrapped = _wrap(network, comm, torch.device("cpu"))
    _train_step(
        wrapped,
        optimiser,
        torch.amp.GradScaler("cpu", enabled=False),
        settings,
        to_device(batch, "cpu"),
        "pretrain",
        torch.device("cpu"),
    )
    if rank == 0:
        save_file(
            {k: v.detach().contiguous() for k, v in network.state_dict().items()},
            Path(out_dir) / f"world{world_size}.safetensors",
        )
    if world_size > 1:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_with_the_doubled_batch(tmp_path):
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    _one_step(0, 1, 4, "", str(tmp_path))
    mp.spawn(_one_step, args=(2, 4, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    single = load_file(tmp_path / "world1.safetensors")
    double = load_file(tmp_path / "world2.safetensors")
    start = {f"model.{name}": tensor for name, tensor in tiny_model(kaf=True, seed=0).state_dict().items()}
    moved = 0
    for name, tensor in single.items():
        torch.testing.assert_close(double[name], tensor, rtol=1e-4, atol=1e-6, msg=name)
        if name in start and not torch.equal(start[name], tensor):
            moved += 1
    assert moved > 10  # the step really changed the backbone


def test_cli_pretrain_writes_a_checkpoint_and_refuses_bad_input(tmp_path, capsys):
    from kaf.app.cli import main

    volume = save_nifti(synthetic_volume()[0], tmp_path / "scan.nii.gz")
    out = tmp_path / "pretrained.safetensors"
    common = ["--data", str(volume), "--out", str(out), "--view-size", "32", "--batch-size", "2"]
    assert main(["pretrain", "--method", "kaf", *common, "--steps", "1", "--progress", "jsonl"]) == 0
    printed = capsys.readouterr().out
    assert '"terms": {"L_PCL"' in printed and '"event": "result"' in printed
    assert load_checkpoint(out)[1].method == "kaf"
    paper_out = tmp_path / "paper.safetensors"
    paper = ["--data", str(volume), "--out", str(paper_out), "--view-size", "32", "--batch-size", "2"]
    assert main(["pretrain", "--method", "kaf-paper", *paper, "--steps", "1"]) == 0
    weights, metadata = load_checkpoint(paper_out)
    assert metadata.method == "kaf-paper" and metadata.extra["transfer"] == ["encoder", "bottleneck"]
    assert any(name.endswith(".momentum_buffer") for name in weights)  # the paper's SGD
    assert metadata.extra["pretrain"]["method_config"]["position_threshold"] == 0.35
    options_out = tmp_path / "options.safetensors"
    options = ["--method-option", "position_threshold=0.1", "--method-option", "pcl_head_norm=false"]
    chosen = ["--data", str(volume), "--out", str(options_out), "--view-size", "32", "--batch-size", "2"]
    assert main(["pretrain", "--method", "kaf", *chosen, "--steps", "1", *options]) == 0
    weights, metadata = load_checkpoint(options_out)
    stored = metadata.extra["pretrain"]["method_config"]
    assert stored["position_threshold"] == 0.1 and stored["pcl_head_norm"] is False
    assert not any(".running_mean" in name for name in weights if name.startswith("ssl_heads.pcl."))
    for bad, message in [
        ("temperature=-1", "temperature must be positive"),
        ("temperature=nan", "must be finite"),
        ("pcl_head_norm=maybe", "must be true or false"),
        ("no_such_field=1", "one of the kaf method's fields"),
    ]:
        refused = ["--data", str(volume), "--out", str(tmp_path / "bad.safetensors"), "--method-option", bad]
        assert main(["pretrain", "--method", "kaf", *refused, "--progress", "none"]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad.safetensors").exists()

    assert main(["pretrain", "--method", "gcl", *common, "--resume", str(out), "--progress", "none"]) == 2
    assert "pretrained with method 'kaf', not 'gcl'" in capsys.readouterr().err
    assert main(["pretrain", "--method", "kaf", *common, "--steps", "1", "--progress", "none"]) == 2
    assert "already exists" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (
        main(["pretrain", "--method", "kaf", "--data", str(empty), "--out", str(tmp_path / "x.safetensors")])
        == 2
    )
    assert "holds no volume" in capsys.readouterr().err
