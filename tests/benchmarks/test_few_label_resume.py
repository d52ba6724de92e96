"""benchmarks/few_label.py keeps each row's results draw by draw: an interrupted run resumes where it
stopped, and a run with more draws runs only the new ones. Fine-tuning and scoring are replaced by fakes
that record which draws ran; the bookkeeping under test is the benchmark's own."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import few_label  # benchmarks/ is not a package

from kaf.runtime.errors import DeviceError

BUDGET = replace(few_label.LONG.smoke(), labelled=(1, 2), draws=2)
ROW = few_label.Row("unet", None)
FINETUNE_SECONDS = 10.0


class Interrupted(Exception):
    pass


@pytest.fixture
def fake_training(monkeypatch):
    """Fine-tuning returns the seed (the draw) it was given and takes FINETUNE_SECONDS of the benchmark's
    clock, scoring turns it into a Dice array; a list records the (M, draw) of each fine-tune, and `stop_at`
    interrupts the run at that fine-tune."""
    ran: list[tuple[int, int]] = []
    state = SimpleNamespace(ran=ran, stop_at=None, clock=0.0)

    def finetuned_model(cases, volumes, settings, init, config):
        if len(ran) == state.stop_at:
            raise Interrupted
        ran.append((len(volumes), settings.seed))
        state.clock += FINETUNE_SECONDS
        return (len(volumes), settings.seed)

    clock = SimpleNamespace(perf_counter=lambda: state.clock, strftime=time.strftime)
    monkeypatch.setattr(few_label, "time", clock)
    monkeypatch.setattr(few_label, "finetuned_model", finetuned_model)
    monkeypatch.setattr(
        few_label, "score_test_set", lambda model, cases, device: np.array([[model[0] + model[1] / 10]])
    )
    monkeypatch.setattr(few_label, "annotator_protocol", lambda *a: {k: [0.5] for k in BUDGET.annotated})
    return state


def row_run(tmp_path: Path, budget: few_label.Budget) -> few_label.RowRun:
    dataset = few_label.DATASETS["hippocampus"]
    cases = few_label.Cases(dataset, {}, [], [], 0, few_label.preset_config(budget.preset))
    names = [f"case{i}" for i in range(4)]
    for name in names:
        cases.prepared[name] = SimpleNamespace(prepared=SimpleNamespace(slice_count=10))
    args = argparse.Namespace(device="cpu", threads=2)
    fingerprint = budget.fingerprint(dataset.key, 0)
    return few_label.RowRun(cases, ROW, budget, args, tmp_path / "row.json", fingerprint)


def draws(budget: few_label.Budget) -> dict[int, list[list[str]]]:
    return {M: [[f"case{i}" for i in range(M)] for _ in range(budget.draws)] for M in budget.labelled}


def run(tmp_path: Path, budget: few_label.Budget) -> few_label.RowResults:
    row = row_run(tmp_path, budget)
    saved = few_label.load_row(row.path, row.fingerprint)
    return few_label.run_row(row, saved, draws(budget), [], {})


def test_more_draws_run_only_the_new_ones(tmp_path, fake_training):
    first = run(tmp_path, BUDGET)
    assert fake_training.ran == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert first.complete(BUDGET)
    more = replace(BUDGET, draws=3)
    assert more.fingerprint("hippocampus", 0) == BUDGET.fingerprint("hippocampus", 0)
    fake_training.ran.clear()
    extended = run(tmp_path, more)
    assert fake_training.ran == [(1, 2), (2, 2)]
    assert [float(s[0, 0]) for s in extended.few_label[2]] == pytest.approx([2.0, 2.1, 2.2])
    assert len(extended.runs) == 2
    assert np.array_equal(extended.first_draws(2).few_label[1], first.few_label[1])


def test_an_interrupted_run_resumes_at_the_draw_it_stopped_at(tmp_path, fake_training):
    fake_training.stop_at = 3
    with pytest.raises(Interrupted):
        run(tmp_path, BUDGET)
    row = row_run(tmp_path, BUDGET)
    saved = few_label.load_row(row.path, row.fingerprint)
    assert {M: saved.draws_done(M) for M in BUDGET.labelled} == {1: 2, 2: 1}
    assert not saved.complete(BUDGET) and saved.runs == []
    fake_training.stop_at = None
    resumed = run(tmp_path, BUDGET)
    assert fake_training.ran == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert resumed.complete(BUDGET)


def test_results_of_another_protocol_are_not_reused(tmp_path, fake_training):
    run(tmp_path, BUDGET)
    other = replace(BUDGET, annotator_steps=BUDGET.annotator_steps + 1)
    row = row_run(tmp_path, other)
    assert few_label.load_row(row.path, row.fingerprint).few_label == {}


def test_a_run_reporting_fewer_draws_than_saved_counts_only_their_time(tmp_path, fake_training):
    run(tmp_path, replace(BUDGET, draws=3))
    row = row_run(tmp_path, BUDGET)
    saved = few_label.load_row(row.path, row.fingerprint)
    assert saved.stage_seconds()["few-label"] == 3 * len(BUDGET.labelled) * FINETUNE_SECONDS
    reported = saved.first_draws(2).stage_seconds()
    assert reported["few-label"] == 2 * len(BUDGET.labelled) * FINETUNE_SECONDS
    assert list(reported) == ["few-label", "annotator"]  # random init: no pretraining


def test_a_row_the_device_refuses_is_reported_and_the_others_still_run(tmp_path, fake_training, monkeypatch):
    dataset = few_label.DATASETS["hippocampus"]
    cases = few_label.Cases(dataset, {}, [], [], 0, few_label.preset_config(BUDGET.preset))
    cases.by_patient = {f"p{i}": [f"case{i}"] for i in range(4)}
    cases.pool = list(cases.by_patient)
    for name in [f"case{i}" for i in range(4)]:
        cases.prepared[name] = SimpleNamespace(prepared=SimpleNamespace(slice_count=10))
    monkeypatch.setattr(few_label, "budget_cases", lambda *a: cases)
    refusal = "Not enough memory on cuda:0 for pretraining on 240 views of 32 x 32 per step"

    def pretrained_init(run, results, data_cache):
        raise DeviceError(refusal)

    monkeypatch.setattr(few_label, "pretrained_init", pretrained_init)
    args = argparse.Namespace(device="cpu", threads=2, seed=0, fresh=False)
    rows = [ROW, few_label.ALL_ROWS["kaf+gcl"], few_label.ALL_ROWS["kaf"]]

    results = few_label.run_dataset(dataset, BUDGET, rows, args, tmp_path)

    assert [row.key for row in results.ran(rows)] == ["unet", "kaf"]
    assert results.not_run == {"kaf+gcl": refusal}
    section = few_label.dataset_section(results, BUDGET, rows, None, tmp_path / "BENCHMARKS.md")
    assert f"- {few_label.ALL_ROWS['kaf+gcl'].label}: {refusal}" in section
    assert "| KAF + GCL |" not in section


@pytest.mark.parametrize("budget", [few_label.QUICK, few_label.LONG, few_label.FULL], ids=lambda b: b.mode)
@pytest.mark.parametrize("row", [row for row in few_label.ALL_ROWS.values() if row.method])
def test_every_pretrained_row_gets_valid_pretraining_settings(row, budget):
    """A budget's pretraining settings pass PretrainSettings' own checks (a save interval out of range once
    stopped every long run at its first pretraining)."""
    settings = few_label.pretrain_settings(row, budget, view=64, device="cpu")
    assert settings.steps == budget.pretrain_steps


def test_kaf_pretraining_keeps_its_measured_optimiser():
    """The rate 0.02 was chosen for the paper's SGD; given to the default Adam it would be twenty times
    its measured rate."""
    kaf = few_label.pretrain_settings(few_label.Row("kaf", "kaf"), few_label.LONG, view=64, device="cpu")
    paper = few_label.pretrain_settings(few_label.Row("kaf", "kaf-paper"), few_label.LONG, 64, "cpu")
    assert kaf.learning_rate is None
    assert paper.learning_rate == 0.02


def test_kaf_rows_are_paired_with_unet_gcl_and_the_unet():
    """Issue #20's bar is read from this table: a KAF row against UNet + GCL draw by draw, beside its own
    random init and the UNet's."""
    budget = replace(BUDGET, labelled=(1,), draws=3)

    def row(*draw_dice: float) -> few_label.RowResults:
        return few_label.RowResults(few_label={1: [np.array([[dice]]) for dice in draw_dice]})

    rows = {"kaf+gcl": row(0.5, 0.6, 0.4), "unet+gcl": row(0.4, 0.5, 0.5), "unet": row(0.1, 0.1, 0.1)}
    results = few_label.DatasetResults(cases=None, rows=rows, copy_baseline={}, draws={})
    lines = few_label.paired_comparisons(results, budget, [few_label.ALL_ROWS[key] for key in rows])
    table = [line for line in lines if line.startswith("| KAF")]
    assert table == [
        "| KAF + GCL | UNet + GCL | 2 of 3 | +0.033 | 1.000 |",
        "| KAF + GCL | UNet, random init | 3 of 3 | +0.400 | 0.250 |",
    ]
    assert not [line for line in lines if line.startswith("| UNet + GCL | UNet + GCL")]


def test_a_methods_other_configuration_is_paired_with_the_method():
    """Whether translated local views help GCL is read from gcl-shifted against gcl, draw by draw."""
    rows = [few_label.ALL_ROWS[key] for key in ("unet+gcl-shifted", "kaf+gcl-shifted", "kaf+kaf-paper")]
    assert [[other.key for other in few_label.baselines(row)] for row in rows] == [
        ["unet", "unet+gcl"],
        ["kaf", "kaf+gcl", "unet+gcl", "unet"],
        ["kaf", "kaf+kaf", "unet+gcl", "unet"],
    ]


def test_a_run_of_some_rows_gets_its_own_section_beside_the_modes():
    """Running two rows with 8 draws must not replace the section that holds all of the mode's rows."""
    long, rows = few_label.LONG, [few_label.ALL_ROWS["kaf+gcl"], few_label.ALL_ROWS["unet+gcl"]]
    every_row = list(long.rows)
    assert few_label.run_variant(long, every_row, draws_given=False) is None
    assert few_label.run_variant(long, every_row, draws_given=True) == "3 draws"
    assert few_label.run_variant(long, every_row[::-1], draws_given=False) is None
    some = few_label.run_variant(replace(long, draws=8), rows, draws_given=True)
    assert some == "8 draws, rows kaf+gcl unet+gcl"
    full_section = long.markers(["acdc"], "8 draws")
    some_section = long.markers(["acdc"], some)
    assert some_section[0] == "<!-- few-label-long-8-draws-rows-kaf-gcl-unet-gcl-acdc:start -->"
    assert some_section != full_section
    assert full_section[0] == "<!-- few-label-long-8-draws-acdc:start -->"  # the existing section's name
