"""Few-label benchmark (not a test): pretraining methods against random init with M labelled volumes, and
the annotator's protocol with k annotated slices of one volume, on ACDC and MSD hippocampus (issue #6).

Protocol, per dataset (../shared/data):
- Split by patient: a fixed test set (size stated in the output) and a pool. Each method pretrains on the
  pool's images without labels; fine-tuning takes M labelled volumes from the pool (M distinct patients,
  one random frame each, all their slices), over several draws shared by every method.
- Score: per-volume 3D Dice per foreground class (MONAI) on every test volume, the largest component of
  each class kept as the product does; a volume's score is the mean over its foreground classes, a draw's
  the mean over test volumes; each cell is the mean (std) over draws.
- The annotator's protocol: k = 1, 2, 4 annotated slices of one test volume (the slices an annotator would
  pick, kaf.data.metrics.spread_slices), Dice on the other slices of that volume, beside copying the nearest
  annotated slice; mean (std) over the annotated volumes.

Modes: `--quick` (default) fits an hour on 2 CPU cores with the `interactive` preset; `--long` is the
same preset fine-tuned 320 steps after 1000 pretraining steps, 3 draws (about 70 min for hippocampus on 2
CPU cores, hours for ACDC); `--full` uses the paper preset and longer budgets, for a GPU; `--smoke` shrinks
any of them to a few steps, one draw, two test volumes per dataset, M = 1 and k = 2 (an end-to-end check,
its numbers mean nothing).

    python benchmarks/few_label.py [--quick | --long | --full] [--smoke] [--device auto] [--threads 2]
                                   [--datasets acdc hippocampus] [--rows unet kaf kaf+kaf ...] [--draws N]
                                   [--write BENCHMARKS.md] [--plots DIR] [--work DIR] [--fresh]

Each row's results are saved in WORK, the annotator's protocol first and then draw by draw, and a later run of
the same protocol (budget, dataset and seed; the number of draws aside) reuses them: a run too long for one
sitting resumes where it stopped, and a run with more draws runs only the new ones, since draw d is the same
labelled volumes and seed whatever the number of draws (`--fresh` runs every row again). A pretrained row
keeps its weights in WORK until the row is complete.
Results go to WORK/BENCHMARKS.md always, and into the --write file only when asked (between the markers of the
section of this mode and these datasets, keeping the rest of the file); plots (Dice against M and against k)
beside it. A run given `--draws`, or only some of the mode's rows, writes its own section and plots (e.g.
"long mode, 8 draws", "long mode, 8 draws, rows kaf+gcl"), beside the mode's. Each section pairs every
pretrained row with random init of the same network, draw by draw, with a sign test.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure  # no pyplot: no GUI backend
from scipy.stats import binomtest
from speed import machine  # benchmarks/ is on the path when this file runs

from kaf.app.workflow import load_initialisation, prepare_for_training
from kaf.data.keypoints import KeypointConfig
from kaf.data.metrics import copy_nearest_annotated, dice_on_unannotated, dice_per_class, spread_slices
from kaf.data.volume_io import read_labels, read_volume
from kaf.jobs.events import ProgressEvent, drive
from kaf.jobs.finetune import FinetuneSettings, Initialisation
from kaf.jobs.multi_finetune import LabelledVolume, multi_finetune
from kaf.jobs.predict import predict
from kaf.jobs.pretrain import PretrainSettings, pretrain
from kaf.models import KafUNet, ModelConfig, preset_config
from kaf.runtime.devices import resolve_device
from kaf.runtime.errors import DeviceError
from kaf.ssl.data import PretrainData, load_pretrain_data

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
COPY = "copy nearest annotated slice"


@dataclass(frozen=True)
class Dataset:
    key: str
    folder: str
    title: str
    foreground: tuple[str, ...]  # class names, background excluded
    view_size: int  # pretraining views: at most twice the shorter slice side (hippocampus slices ~ 51 x 35)
    frames_per_patient: bool  # ACDC: patientNNN_frame0F; hippocampus: one volume per case

    @property
    def classes(self) -> int:
        return len(self.foreground) + 1

    def patient(self, case: str) -> str:
        return case.split("_frame")[0] if self.frames_per_patient else case


DATASETS = {
    "acdc": Dataset("acdc", "acdc", "ACDC (cine MRI)", ("RV", "Myo", "LV"), 128, True),
    "hippocampus": Dataset(
        "hippocampus", "msd_hippocampus", "MSD hippocampus (T1 MRI)", ("anterior", "posterior"), 32, False
    ),
}


def slug(variant: str | None) -> list[str]:
    """A variant's part of section and file names ("8 draws" -> ["8-draws"], "8 draws, rows kaf+gcl" ->
    ["8-draws-rows-kaf-gcl"])."""
    return [re.sub(r"[^a-z0-9]+", "-", variant.lower()).strip("-")] if variant else []


def run_variant(budget: Budget, rows: list[Row], draws_given: bool) -> str | None:
    """What sets a run apart from its mode: draws other than the mode's, or only some of its rows. A run
    of some rows gets a section of its own, so that it does not replace the section of the mode's rows."""
    parts = [f"{budget.draws} draws"] if draws_given else []
    if set(rows) != set(budget.rows):  # the same rows in another order are the same section
        parts.append("rows " + " ".join(row.key for row in rows))
    return ", ".join(parts) or None


def named_datasets(datasets: list[str]) -> list[str]:
    """The datasets a section's name and heading carry: none where it holds them all."""
    return [] if sorted(datasets) == sorted(DATASETS) else list(datasets)


@dataclass(frozen=True)
class Row:
    backbone: str  # "kaf" or "unet" (the plain UNet of the preset's width)
    method: str | None  # pretraining method; None: random init

    @property
    def key(self) -> str:
        return self.backbone if self.method is None else f"{self.backbone}+{self.method}"

    @property
    def label(self) -> str:
        names = {
            "kaf": "KAF",
            "kaf-paper": "KAF (paper settings)",
            "gcl": "GCL",
            "gcl-shifted": "GCL (translated local views)",
            "pgl": "PGL",
            "dense": "dense hierarchical",
            "unet": "UNet",
        }
        if self.method is None:
            return f"{names[self.backbone]}, random init"
        suffix = " pretraining" if self.method == self.backbone else ""
        return f"{names[self.backbone]} + {names[self.method]}{suffix}"


REQUIRED_ROWS = (
    Row("unet", None),
    Row("kaf", None),
    Row("kaf", "kaf"),
    Row("unet", "gcl"),
    Row("unet", "pgl"),
    Row("unet", "dense"),
)
EXTRA_ROWS = (
    Row("kaf", "kaf-paper"),
    Row("kaf", "gcl"),
    Row("kaf", "pgl"),
    Row("kaf", "dense"),
    Row("unet", "gcl-shifted"),
    Row("kaf", "gcl-shifted"),
)
ALL_ROWS = {row.key: row for row in REQUIRED_ROWS + EXTRA_ROWS}


@dataclass(frozen=True)
class Budget:
    mode: str
    preset: str
    rows: tuple[Row, ...]
    labelled: tuple[int, ...]  # M
    draws: int
    test_patients: dict[str, int]
    annotated: tuple[int, ...]  # k
    annotator_volumes: int  # test volumes the annotator's protocol runs on
    pretrain_steps: int  # per stage (GCL has two)
    pretrain_batch: dict[str, int]  # items per step where not the method's default
    pretrain_learning_rate: dict[str, float]  # where not the method's default
    finetune: FinetuneSettings
    finetune_epochs: float | None  # None: finetune.steps; else steps = epochs x pool slices / batch
    annotator_steps: int
    note: str  # what the numbers of this mode can and cannot say

    def smoke(self) -> Budget:
        return replace(
            self,
            mode=f"{self.mode} --smoke",
            labelled=(1,),
            draws=1,
            test_patients={"acdc": 1, "hippocampus": 2},  # two test volumes each
            annotated=(2,),
            annotator_volumes=1,
            pretrain_steps=2,
            pretrain_batch={method: 2 for method in ("kaf", "kaf-paper", "pgl", "dense")},
            pretrain_learning_rate={},
            finetune=replace(self.finetune, steps=3),
            finetune_epochs=None,
            annotator_steps=3,
            note="Smoke run: a few steps of everything, an end-to-end check; the numbers mean nothing.",
        )

    @property
    def section(self) -> str:
        """The name of this mode's plots and work folder; the quick mode keeps the plain one."""
        return "few-label" if self.mode == "quick" else "few-label-" + self.mode.replace(" --", "-")

    @property
    def file_stem(self) -> str:
        return self.section.replace("-", "_")

    def markers(self, datasets: list[str], variant: str | None) -> tuple[str, str]:
        """BENCHMARKS.md markers: one section per mode, variant and set of datasets, so that a mode run on
        one dataset (or with other draws) does not replace the section of another."""
        name = "-".join([self.section, *slug(variant), *named_datasets(datasets)])
        return f"<!-- {name}:start -->", f"<!-- {name}:end -->"

    def fingerprint(self, dataset: str, seed: int) -> str:
        """What a row's saved results depend on: the budget (its rows, note and number of draws aside),
        dataset and seed."""
        protocol = replace(self, rows=(), note="", draws=0)
        return hashlib.sha256(repr((protocol, dataset, seed)).encode()).hexdigest()[:16]

    def finetune_steps(self, slices: int) -> int:
        if self.finetune_epochs is None:
            return self.finetune.steps
        return max(1, math.ceil(self.finetune_epochs * slices / self.finetune.batch_size))


QUICK = Budget(
    mode="quick",
    preset="interactive",
    rows=REQUIRED_ROWS,
    labelled=(1, 2, 6),
    draws=2,
    test_patients={"acdc": 6, "hippocampus": 6},
    annotated=(1, 2, 4),
    # About 5.5 min per ACDC volume and 2 per hippocampus volume on 2 cores: three of each fit the hour.
    annotator_volumes=3,
    pretrain_steps=50,
    # GCL keeps its own batch: one group of 48 slices, 10 local.
    pretrain_batch={"kaf": 8, "kaf-paper": 8, "pgl": 8, "dense": 4},
    # KAF's paper optimiser (SGD 0.002) barely moves the weights in a short run: 600 steps of batch 16 on
    # hippocampus moved the encoder by 2.4 % (relative L2) from its initialisation, so the paper settings
    # run at ten times its rate. `kaf` itself uses its default, the measured Adam 1e-3 (BENCHMARKS.md).
    pretrain_learning_rate={"kaf-paper": 0.02},
    # Measured on 2 idle cores (s/step, KAF / UNet): ACDC 0.74 / 0.11, hippocampus 0.33 / 0.05. With 80
    # steps the whole quick run took 31 min (BENCHMARKS.md), so about 150 would still fit the hour.
    finetune=FinetuneSettings(preset="interactive", steps=80, batch_size=4, crop_size=96),
    finetune_epochs=None,
    annotator_steps=80,
    note="Quick mode: 80 fine-tuning steps and 50 pretraining steps are far from convergence (on ACDC a "
    "UNet needs about 300 steps to pass 0.4 Dice): the numbers check the protocol and rank roughly; "
    "compare methods with the full mode.",
)
# benchmarks/learning_curves.py, hippocampus, M = 2, 3 draws: at 80 steps single runs scored 0.0-0.47 mean
# Dice; at 320 UNet(c1) scored 0.74 and both KAF presets 0.71, each with a std under 0.04.
LONG = replace(
    QUICK,
    mode="long",
    draws=3,
    pretrain_steps=1000,  # as the shipped weights (core/kaf/weights/MODEL_CARD.md)
    finetune=replace(QUICK.finetune, steps=320),
    annotator_steps=320,
    note="Long mode: fine-tuning long enough for every model to level off on hippocampus (320 steps; "
    "benchmarks/learning_curves.py), 1000 pretraining steps; still the `interactive` preset and a CPU.",
)
# METHODS.md A.6, ACDC: Adam 5e-4 -> 5e-5 cosine, 201 epochs of batch 10 (our loss stays Dice + CE);
# pretraining: the same number of steps per stage for every method, each with its own batch.
FULL = Budget(
    mode="full",
    preset="paper-acdc",
    rows=REQUIRED_ROWS + EXTRA_ROWS,
    labelled=(1, 2, 6),
    draws=5,
    test_patients={"acdc": 8, "hippocampus": 40},
    annotated=(1, 2, 4),
    annotator_volumes=4,
    pretrain_steps=2000,
    pretrain_batch={},
    pretrain_learning_rate={},
    finetune=FinetuneSettings(
        preset="paper-acdc", batch_size=10, crop_size=352, learning_rate=5e-4, final_learning_rate=5e-5
    ),
    finetune_epochs=201,
    annotator_steps=150,
    note="Full mode: the paper's fine-tuning schedule (METHODS.md A.6), each method's own pretraining batch.",
)

# Reported ACDC numbers (METHODS.md A.7 and B.5): other protocols (100 patients, 5-fold CV and pooled 2D
# Dice for KAF; 20 fixed test volumes and labelled volumes for GCL), shown for orientation only.
PAPER = (
    ("unet", "KAF paper, Table 2 A (UNet(c1), random)", {6: 0.782}),
    ("unet", "GCL paper, random init (M = 8: 0.844)", {1: 0.614, 2: 0.702}),
    ("kaf", "KAF paper, Table 2 F (KAF, random)", {6: 0.827}),
    ("kaf+kaf", "KAF paper, appendix (KAF + SSL)", {2: 0.741, 6: 0.873}),
    ("unet+gcl", "GCL paper, G^D + L^R (M = 8: 0.872)", {1: 0.725, 2: 0.789}),
)


# --- data ---------------------------------------------------------------------------------------------------


@dataclass
class Cases:
    """A dataset's volumes by patient, its split, and the volumes prepared so far (keypoints cached)."""

    dataset: Dataset
    by_patient: dict[str, list[str]]
    test: list[str]  # patients
    pool: list[str]
    seed: int
    config: ModelConfig
    prepared: dict[str, LabelledVolume] = field(default_factory=dict)

    def image(self, case: str) -> Path:
        return DATA / self.dataset.folder / "images" / f"{case}.nii.gz"

    def volume(self, case: str) -> LabelledVolume:
        if case not in self.prepared:
            image = read_volume(self.image(case))
            labels = read_labels(DATA / self.dataset.folder / "labels" / f"{case}.nii.gz", image)
            self.prepared[case] = LabelledVolume(prepare_for_training(image, self.config), labels, None, case)
        return self.prepared[case]

    def test_cases(self) -> list[str]:
        return [case for patient in self.test for case in self.by_patient[patient]]

    def pool_cases(self) -> list[str]:
        return [case for patient in self.pool for case in self.by_patient[patient]]

    def draw(self, labelled: int, draw: int) -> list[str]:
        """M distinct pool patients, one random frame each; the same for every method."""
        rng = np.random.default_rng([self.seed, labelled, draw])
        patients = rng.choice(len(self.pool), size=labelled, replace=False)
        return [
            self.by_patient[self.pool[p]][rng.integers(len(self.by_patient[self.pool[p]]))] for p in patients
        ]


def split_cases(dataset: Dataset, test_patients: int, needed: int, seed: int, config: ModelConfig) -> Cases:
    names = sorted(
        p.name.removesuffix(".nii.gz") for p in (DATA / dataset.folder / "images").glob("*.nii.gz")
    )
    by_patient: dict[str, list[str]] = {}
    for name in names:
        by_patient.setdefault(dataset.patient(name), []).append(name)
    order = np.random.default_rng(seed).permutation(len(by_patient))
    patients = [sorted(by_patient)[i] for i in order]
    test, pool = sorted(patients[:test_patients]), sorted(patients[test_patients:])
    if len(pool) < needed:
        raise SystemExit(f"{dataset.key}: {len(pool)} pool patients, fewer than M = {needed}")
    return Cases(dataset, by_patient, test, pool, seed, config)


def budget_cases(dataset: Dataset, budget: Budget, seed: int) -> Cases:
    """The split a budget runs on: its test set size, a pool with room for its largest M, its preset."""
    return split_cases(
        dataset, budget.test_patients[dataset.key], max(budget.labelled), seed, preset_config(budget.preset)
    )


# --- pretraining, fine-tuning, scoring ----------------------------------------------------------------------


def loss_terms(terms: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.3f}" for name, value in terms.items())


def every_tenth(prefix: str) -> Callable[[ProgressEvent], None]:
    def show(event: ProgressEvent) -> None:
        if event.loss is not None and (
            event.step == event.total or event.step % max(1, event.total // 10) == 0
        ):
            terms = loss_terms(event.terms or {})
            print(
                f"  {prefix} {event.stage} {event.step}/{event.total} loss {event.loss:.3f}"
                + (f" ({terms})" if terms else ""),
                flush=True,
            )

    return show


@dataclass
class TermLog:
    """Each pretraining step's loss terms by stage, to report where they ended: a contrastive term that
    stays at its chance value has learnt nothing, whatever the fine-tuning scores say."""

    show: Callable[[ProgressEvent], None]
    steps: dict[str, list[dict[str, float]]] = field(default_factory=dict)

    def __call__(self, event: ProgressEvent) -> None:
        self.show(event)
        if event.terms is not None and not event.message:
            self.steps.setdefault(event.stage, []).append(event.terms)

    def final(self) -> dict[str, float]:
        """Each stage's terms, mean over its last tenth of steps."""
        final = {}
        for stage, steps in self.steps.items():
            tail = steps[-max(1, len(steps) // 10) :]
            final |= {f"{stage}: {name}": float(np.mean([s[name] for s in tail])) for name in tail[0]}
        return final


def backbone_config(budget: Budget, backbone: str) -> ModelConfig:
    config = preset_config(budget.preset)
    return config if backbone == "kaf" else config.plain_unet()


def pool_pretrain_data(cases: Cases, view: int) -> PretrainData:
    """The pool's images (no labels), with keypoints, for pretraining on views of `view` px."""
    return load_pretrain_data(
        [cases.image(case) for case in cases.pool_cases()],
        cases.config.input_size,
        view // 2,
        KeypointConfig(max_keypoints=cases.config.max_keypoints),
    )


def pretrain_settings(row: Row, budget: Budget, view: int, device: str) -> PretrainSettings:
    return PretrainSettings(
        method=row.method,
        preset=budget.preset,
        backbone=row.backbone,
        steps=budget.pretrain_steps,
        batch_size=budget.pretrain_batch.get(row.method),
        learning_rate=budget.pretrain_learning_rate.get(row.method),
        view_size=view,
        device=device,
        save_every=budget.pretrain_steps,  # once, at the end
    )


def pretrain_checkpoint(
    cases: Cases, row: Row, budget: Budget, device: str, out: Path, data_cache: dict
) -> dict[str, float]:
    """Pretrain into `out`; the loss terms at the end of pretraining (TermLog.final)."""
    view = cases.dataset.view_size
    if view not in data_cache:
        data_cache[view] = pool_pretrain_data(cases, view)
    settings = pretrain_settings(row, budget, view, device)
    log = TermLog(every_tenth(f"{cases.dataset.key} {row.key}"))
    drive(pretrain(data_cache[view], settings, out), log)
    return log.final()


def finetuned_model(
    cases: Cases,
    volumes: list[LabelledVolume],
    settings: FinetuneSettings,
    init: Initialisation | None,
    config: ModelConfig,
) -> KafUNet:
    result = drive(
        multi_finetune(
            volumes,
            cases.dataset.classes,
            settings,
            init,
            model_config=config,
            label_names=["background", *cases.dataset.foreground],
        )
    )
    return result.model


def score_test_set(model: KafUNet, cases: Cases, device: str) -> np.ndarray:
    """[test volumes, foreground classes] per-volume 3D Dice."""
    scores = []
    for case in cases.test_cases():
        volume = cases.volume(case)
        labels = drive(predict(model, volume.prepared, device)).labels
        scores.append(dice_per_class(labels, volume.labels, cases.dataset.classes))
    return np.array(scores)


def annotated_slices(volume: LabelledVolume, k: int) -> LabelledVolume:
    """The volume with only the k slices an annotator would pick labelled."""
    return LabelledVolume(volume.prepared, volume.labels, tuple(spread_slices(volume.labels, k)), volume.name)


def dice_elsewhere(prediction: np.ndarray, sparse: LabelledVolume, classes: int) -> float:
    """Mean foreground Dice on the slices not annotated."""
    return dice_on_unannotated(prediction, sparse.labels, sparse.slices, classes)[0]


@dataclass
class RowResults:
    """A row's results so far: the annotator's protocol first, then draws one at a time."""

    few_label: dict[int, list[np.ndarray]] = field(default_factory=dict)  # M -> per draw [volumes, classes]
    annotator: dict[int, list[float]] = field(default_factory=dict)  # k -> per annotated volume
    # Fine-tuning and scoring per draw, so that a run reporting fewer draws than were saved counts only its
    # own; the other stages' seconds (pretraining once, the annotator's protocol) are in `seconds`.
    draw_seconds: dict[int, list[float]] = field(default_factory=dict)  # M -> per draw
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    runs: list[str] = field(default_factory=list)  # each run that added to it: when, where, which commit
    pretraining_terms: dict[str, float] = field(default_factory=dict)  # TermLog.final; none: random init

    def draws_done(self, labelled: int) -> int:
        return len(self.few_label.get(labelled, []))

    def annotator_done(self, budget: Budget) -> bool:
        return all(k in self.annotator for k in budget.annotated)

    def complete(self, budget: Budget) -> bool:
        draws_done = all(self.draws_done(M) >= budget.draws for M in budget.labelled)
        return draws_done and self.annotator_done(budget)

    def first_draws(self, draws: int) -> RowResults:
        """These results as a run with `draws` draws reports them (a run with more may have saved more)."""
        few_label = {M: scores[:draws] for M, scores in self.few_label.items()}
        draw_seconds = {M: seconds[:draws] for M, seconds in self.draw_seconds.items()}
        return replace(self, few_label=few_label, draw_seconds=draw_seconds)

    def stage_seconds(self) -> dict[str, float]:
        """Seconds per stage: pretraining, fine-tuning and scoring of every draw, the annotator's protocol."""
        stages = {**self.seconds, "few-label": sum(sum(s) for s in self.draw_seconds.values())}
        return {stage: stages[stage] for stage in ("pretrain", "few-label", "annotator") if stage in stages}


@dataclass
class DatasetResults:
    cases: Cases
    rows: dict[str, RowResults]
    copy_baseline: dict[int, list[float]]  # k -> per annotated volume
    draws: dict[int, list[list[str]]]  # M -> labelled volumes of each draw
    not_run: dict[str, str] = field(default_factory=dict)  # row key -> why the device refused it

    def ran(self, rows: list[Row]) -> list[Row]:
        return [row for row in rows if row.key in self.rows]


def commit() -> str:
    described = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=Path(__file__).parent, capture_output=True, text=True
    )
    return described.stdout.strip() or "unknown commit"


def save_row(path: Path, fingerprint: str, row: RowResults) -> None:
    record = {
        "fingerprint": fingerprint,
        "few_label": {str(M): [a.tolist() for a in draws] for M, draws in row.few_label.items()},
        "annotator": {str(k): values for k, values in row.annotator.items()},
        "draw_seconds": {str(M): seconds for M, seconds in row.draw_seconds.items()},
        "seconds": row.seconds,
        "runs": row.runs,
        "pretraining_terms": row.pretraining_terms,
    }
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(record, indent=1))
    partial.replace(path)  # a run killed mid-write leaves the previous file whole


def load_row(path: Path, fingerprint: str) -> RowResults:
    """A row's results from earlier runs of the same protocol; empty where there are none."""
    if not path.exists():
        return RowResults()
    record = json.loads(path.read_text())
    if record["fingerprint"] != fingerprint:
        print(f"  {path}: from another budget or seed, run again", flush=True)
        return RowResults()
    if "draw_seconds" not in record:
        print(f"  {path}: from an earlier version of this benchmark (no draw times), run again", flush=True)
        return RowResults()
    return RowResults(
        {int(M): [np.array(a, dtype=float) for a in draws] for M, draws in record["few_label"].items()},
        {int(k): values for k, values in record["annotator"].items()},
        {int(M): seconds for M, seconds in record["draw_seconds"].items()},
        record["seconds"],
        record["runs"],
        record["pretraining_terms"],
    )


@dataclass
class RowRun:
    """One row being run: what it needs, and where its results and pretrained weights are kept."""

    cases: Cases
    row: Row
    budget: Budget
    args: argparse.Namespace
    path: Path  # the row's results
    fingerprint: str

    @property
    def weights(self) -> Path:
        return self.path.with_name(f"{self.path.stem}_{self.fingerprint}.safetensors")

    def save(self, results: RowResults) -> None:
        save_row(self.path, self.fingerprint, results)


def pretrained_weights(run: RowRun) -> Initialisation:
    # No preset check: a UNet row's weights are the preset's plain UNet, which the preset itself is not.
    return load_initialisation(run.weights, preset=None)


def pretrained_init(run: RowRun, results: RowResults, data_cache: dict) -> Initialisation:
    """The row's pretrained weights: those an interrupted run kept, else pretrained now (seeded, so on the
    same machine the same as the weights the saved draws were fine-tuned from: the loss terms say so)."""
    if results.pretraining_terms and run.weights.exists():
        return pretrained_weights(run)
    started = time.perf_counter()
    terms = pretrain_checkpoint(run.cases, run.row, run.budget, run.args.device, run.weights, data_cache)
    if results.pretraining_terms and terms != results.pretraining_terms:
        print(f"  pretrained again, other loss terms than before: {loss_terms(terms)}", flush=True)
    results.pretraining_terms = results.pretraining_terms or terms
    results.seconds["pretrain"] = time.perf_counter() - started  # one pretraining, however many runs
    run.save(results)
    return pretrained_weights(run)


def run_row(
    run: RowRun,
    results: RowResults,
    draws: dict[int, list[list[str]]],
    annotator_cases: list[str],
    data_cache: dict,
) -> RowResults:
    """Add the draws and annotator's results `results` lacks, saving after each."""
    cases, row, budget, device = run.cases, run.row, run.budget, run.args.device
    when = time.strftime("%Y-%m-%d %H:%M")  # and the commit, as the run starts: the code it ran
    this_run = f"{when}, {device_description(device)}, {run.args.threads} threads, {commit()}"
    init = None if row.method is None else pretrained_init(run, results, data_cache)
    config = backbone_config(budget, row.backbone)
    # The annotator's protocol first: the product's own use and the cheaper part, so that a run cut short
    # keeps it.
    if not results.annotator_done(budget):
        started = time.perf_counter()
        results.annotator = annotator_protocol(cases, row, annotator_cases, init, budget, device)
        results.seconds["annotator"] = time.perf_counter() - started
        run.save(results)
    for M, drawn in draws.items():
        for d in range(results.draws_done(M), len(drawn)):
            started = time.perf_counter()
            volumes = [cases.volume(name) for name in drawn[d]]
            steps = budget.finetune_steps(sum(v.prepared.slice_count for v in volumes))
            settings = replace(budget.finetune, steps=steps, seed=d, device=device)
            scores = score_test_set(finetuned_model(cases, volumes, settings, init, config), cases, device)
            results.few_label.setdefault(M, []).append(scores)
            results.draw_seconds.setdefault(M, []).append(time.perf_counter() - started)
            run.save(results)
            print(f"  {cases.dataset.key} {row.key} M={M} draw {d}: {np.nanmean(scores):.3f}", flush=True)
    results.runs.append(this_run)
    run.save(results)
    run.weights.unlink(missing_ok=True)  # up to a GB each with the paper preset
    return results


def run_dataset(
    dataset: Dataset, budget: Budget, rows: list[Row], args: argparse.Namespace, work: Path
) -> DatasetResults:
    """Every row's results: from WORK where earlier runs of the same protocol left them (so a run too long
    for one sitting resumes draw by draw), else run and saved there."""
    cases = budget_cases(dataset, budget, args.seed)
    print(f"{dataset.key}: test patients {cases.test}; pool of {len(cases.pool)} patients", flush=True)
    draws = {M: [cases.draw(M, d) for d in range(budget.draws)] for M in budget.labelled}
    annotator_cases = cases.test_cases()[: budget.annotator_volumes]
    copy_baseline = {}
    for k in budget.annotated:
        sparse = [annotated_slices(cases.volume(case), k) for case in annotator_cases]
        copies = [copy_nearest_annotated(s.labels, s.slices) for s in sparse]
        copy_baseline[k] = [
            dice_elsewhere(copy, s, dataset.classes) for copy, s in zip(copies, sparse, strict=True)
        ]
    results = DatasetResults(cases, {}, copy_baseline, draws)
    fingerprint = budget.fingerprint(dataset.key, args.seed)
    data_cache: dict = {}
    for row in rows:
        run = RowRun(cases, row, budget, args, work / f"{dataset.key}_{row.key}.json", fingerprint)
        saved = RowResults() if args.fresh else load_row(run.path, fingerprint)
        if saved.complete(budget):
            print(f"  {dataset.key} {row.key}: earlier runs' results ({'; '.join(saved.runs)})", flush=True)
        else:
            try:
                saved = run_row(run, saved, draws, annotator_cases, data_cache)
            except DeviceError as refused:  # a step too large for this device: report it, run the others
                print(f"  {dataset.key} {row.key}: not run: {refused}", flush=True)
                results.not_run[row.key] = str(refused)
                continue
        results.rows[row.key] = saved.first_draws(budget.draws)
    return results


def annotator_protocol(
    cases: Cases,
    row: Row,
    annotated_cases: list[str],
    init: Initialisation | None,
    budget: Budget,
    device: str,
) -> dict[int, list[float]]:
    """k -> per volume Dice on the slices not annotated."""
    settings = replace(budget.finetune, steps=budget.annotator_steps, device=device)
    scores: dict[int, list[float]] = {}
    for k in budget.annotated:
        scores[k] = []
        for case in annotated_cases:
            sparse = annotated_slices(cases.volume(case), k)
            model = finetuned_model(cases, [sparse], settings, init, backbone_config(budget, row.backbone))
            prediction = drive(predict(model, sparse.prepared, device)).labels
            scores[k].append(dice_elsewhere(prediction, sparse, cases.dataset.classes))
            print(f"  {cases.dataset.key} {row.key} k={k} {case} {list(sparse.slices)}: {scores[k][-1]:.3f}")
    return scores


# --- report -------------------------------------------------------------------------------------------------


def cell(values) -> str:
    values = np.asarray(values, dtype=float)
    if values.size == 0 or np.all(np.isnan(values)):
        return "–"
    if values.size == 1:
        return f"{float(values[0]):.3f}"
    return f"{np.nanmean(values):.3f} ({np.nanstd(values, ddof=1):.3f})"


def draw_means(per_draw: list[np.ndarray]) -> np.ndarray:
    """Mean foreground Dice of each draw: class mean per volume, then mean over test volumes."""
    return np.array([np.nanmean(np.nanmean(scores, axis=1)) for scores in per_draw])


def dataset_section(
    results: DatasetResults, budget: Budget, rows: list[Row], plot: Path | None, md: Path
) -> str:
    cases, dataset = results.cases, results.cases.dataset
    test = cases.test_cases()
    rows = results.ran(rows)
    lines = [
        f"### {dataset.title}",
        "",
        f"Split by patient (seed {cases.seed}): **{len(cases.test)} test patient(s)** "
        f"({len(test)} volumes: {', '.join(cases.test)}); a pool of {len(cases.pool)} patients "
        f"({len(cases.pool_cases())} volumes) for pretraining (images only) and the labelled draws.",
        "",
        f"Mean foreground 3D Dice on the test volumes, mean (std) over {budget.draws} draw(s) of M labelled "
        "volumes:",
        "",
        "| method | " + " | ".join(f"M = {M}" for M in budget.labelled) + " |",
        "|---|" + "---|" * len(budget.labelled),
    ]
    for row in rows:
        cells = [cell(draw_means(results.rows[row.key].few_label[M])) for M in budget.labelled]
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    if results.not_run:
        lines += ["", "Not run on this machine (each refused before allocating):", ""]
        lines += [f"- {ALL_ROWS[key].label}: {why}" for key, why in results.not_run.items()]
    lines += paired_comparisons(results, budget, rows)
    lines += ["", "Per class (mean (std) over draws):", ""]
    lines += ["| method | M | " + " | ".join(dataset.foreground) + " |"]
    lines += ["|---|---|" + "---|" * len(dataset.foreground)]
    for row in rows:
        for M in budget.labelled:
            per_draw = np.array([np.nanmean(s, axis=0) for s in results.rows[row.key].few_label[M]])
            lines.append(
                f"| {row.label} | {M} | "
                + " | ".join(cell(per_draw[:, c]) for c in range(per_draw.shape[1]))
                + " |"
            )
    annotator_cases = test[: budget.annotator_volumes]
    lines += [
        "",
        f"The annotator's protocol: k annotated slices of {', '.join(annotator_cases)}, mean foreground Dice "
        f"on the other slices ({budget.annotator_steps} fine-tuning steps; mean (std) over volumes):",
        "",
        "| method | " + " | ".join(f"k = {k}" for k in budget.annotated) + " |",
        "|---|" + "---|" * len(budget.annotated),
    ]
    annotator = [(row.label, results.rows[row.key].annotator) for row in rows]
    for label, scores in [*annotator, (f"*{COPY}*", results.copy_baseline)]:
        lines.append(f"| {label} | " + " | ".join(cell(scores[k]) for k in budget.annotated) + " |")
    if dataset.key == "acdc":
        lines += ["", *paper_table(results, budget)]
    else:
        lines += ["", "No published numbers for this dataset with these methods."]
    if plot is not None:
        lines += ["", f"![Dice against M and k, {dataset.title}]({os.path.relpath(plot, md.parent)})"]
    lines += ["", "<details><summary>Labelled volumes of each draw</summary>", ""]
    for M, draws in results.draws.items():
        lines += [f"- M = {M}: " + "; ".join(", ".join(names) for names in draws)]
    lines += ["", "</details>", ""]
    return "\n".join(lines)


def sign_test(higher: int, lower: int) -> str:
    if higher + lower == 0:
        return "–"
    p = binomtest(higher, higher + lower).pvalue
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


# A method's other configuration -> the one it departs from: the pair that says whether the change helps.
CONFIGURATION_OF = {"kaf-paper": "kaf", "gcl-shifted": "gcl"}


def baselines(row: Row) -> list[Row]:
    """The rows `row` is paired with: random init of its own network, the method it is a configuration
    of, and for a KAF row also issue #20's bar, UNet + GCL and the UNet from random init."""
    against = [Row(row.backbone, None)] if row.method is not None else []
    if row.method in CONFIGURATION_OF:
        against.append(Row(row.backbone, CONFIGURATION_OF[row.method]))
    if row.backbone == "kaf":
        against += [Row("unet", "gcl"), Row("unet", None)]
    return against


def paired_comparisons(results: DatasetResults, budget: Budget, rows: list[Row]) -> list[str]:
    """Rows against their baselines, draw by draw (every row fine-tunes on the same labelled volumes): how
    often it scored higher, the mean difference, and the exact two-sided sign test (ties dropped), which
    asks nothing of the differences' distribution."""
    lines = []
    for row in rows:
        for baseline in baselines(row):
            if baseline.key not in results.rows:
                continue
            ours, theirs = results.rows[row.key].few_label, results.rows[baseline.key].few_label
            differences = np.concatenate(
                [draw_means(ours[M]) - draw_means(theirs[M]) for M in budget.labelled]
            )
            higher, lower = int(np.sum(differences > 0)), int(np.sum(differences < 0))
            lines.append(
                f"| {row.label} | {baseline.label} | {higher} of {len(differences)} | "
                f"{np.nanmean(differences):+.3f} | {sign_test(higher, lower)} |"
            )
    if not lines:
        return []
    return [
        "",
        "Paired over every M and draw (the same labelled volumes): each pretrained row against random init "
        "of its network (and a method's other configuration against the method), and each KAF row against "
        "UNet + GCL and the UNet from random init (issue #20):",
        "",
        "| method | against | higher in | mean difference | sign test p (two-sided) |",
        "|---|---|---|---|---|",
        *lines,
    ]


def paper_table(results: DatasetResults, budget: Budget) -> list[str]:
    lines = [
        "Reported on ACDC (METHODS.md A.7, B.5), beside ours for the same row and M. Other protocols: "
        "the KAF paper used 100 patients, 5-fold CV, pooled 2D Dice, the paper preset, best epoch on the "
        "test fold; GCL 20 fixed test volumes and its own UNet. For orientation, not comparison:",
        "",
        "| source | " + " | ".join(f"M = {M}: paper (ours)" for M in budget.labelled) + " |",
        "|---|" + "---|" * len(budget.labelled),
    ]
    for key, source, values in PAPER:
        if key not in results.rows:
            continue
        cells = []
        for M in budget.labelled:
            ours = draw_means(results.rows[key].few_label[M])
            cells.append(f"{values[M]:.3f} ({np.nanmean(ours):.3f})" if M in values else "–")
        lines.append(f"| {source} | " + " | ".join(cells) + " |")
    return lines


def plot_dataset(results: DatasetResults, budget: Budget, rows: list[Row], path: Path) -> Path:
    figure = Figure(figsize=(10, 4), layout="constrained")
    left, right = figure.subplots(1, 2)
    for row in rows:
        colour = f"C{list(ALL_ROWS).index(row.key)}"  # the same for a row in every plot
        means = [draw_means(results.rows[row.key].few_label[M]) for M in budget.labelled]
        spread = [np.nanstd(m, ddof=1) if len(m) > 1 else 0.0 for m in means]
        left.errorbar(
            budget.labelled,
            [np.nanmean(m) for m in means],
            yerr=spread,
            marker="o",
            capsize=3,
            color=colour,
            label=row.label,
        )
        right.plot(
            budget.annotated,
            [np.mean(results.rows[row.key].annotator[k]) for k in budget.annotated],
            marker="o",
            color=colour,
        )
    right.plot(
        budget.annotated,
        [np.mean(results.copy_baseline[k]) for k in budget.annotated],
        "k--",
        marker="x",
        label=COPY,
    )
    left.set(xlabel="M labelled volumes", ylabel="mean foreground 3D Dice (test)", xticks=budget.labelled)
    right.set(xlabel="k annotated slices", ylabel="Dice on the other slices", xticks=budget.annotated)
    left.set_ylim(0, 1)
    right.set_ylim(0, 1)
    left.set_title(f"{results.cases.dataset.title}: few labels")
    right.set_title("annotator's protocol")
    figure.legend(*left.get_legend_handles_labels(), loc="outside lower center", ncols=3, fontsize="small")
    right.legend(fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


def finetune_length(budget: Budget) -> str:
    if budget.finetune_epochs:
        return f"{budget.finetune_epochs:g} epochs"
    return f"{budget.finetune.steps} steps"


def device_description(name: str) -> str:
    device = resolve_device(name)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}; host {machine()}; device {device}"
    return f"{machine()}; device {device}"


def report(
    all_results,
    budget: Budget,
    rows: list[Row],
    args,
    plots: dict,
    md: Path,
    variant: str | None,
) -> str:
    settings = budget.finetune
    batches = ", ".join(f"{m} {b}" for m, b in budget.pretrain_batch.items()) or "each method's own"
    rates = ", ".join(f"{m} {r:g}" for m, r in budget.pretrain_learning_rate.items())
    rates = f"{rates}; the others the paper's" if rates else "each paper's"
    start, end = budget.markers(list(all_results), variant)
    named = named_datasets(list(all_results))
    every_row = [row for results in all_results.values() for row in results.rows.values()]
    compute = sum(sum(row.stage_seconds().values()) for row in every_row)
    lines = [
        start,
        f"## Few-label benchmark, {budget.mode} mode"
        + (f", {variant}" if variant else "")
        + (f" ({', '.join(named)})" if named else ""),
        "",
        f"Command: `{shlex.join(['python', *sys.argv])}`  ",
        f"Machine: {device_description(args.device)}, {args.threads} threads; "
        f"{time.strftime('%Y-%m-%d')}; {compute / 60:.0f} min of pretraining, fine-tuning and scoring, "
        "summed over the rows (each row's runs are listed at the end).  ",
        f"Mode **{budget.mode}**, preset `{budget.preset}` (UNet rows: its plain UNet(c1) of that width).  ",
        f"Pretraining: {budget.pretrain_steps} steps per stage, batch ({batches}), learning rate "
        f"({rates}), views "
        + ", ".join(f"{DATASETS[key].view_size} px ({key})" for key in all_results)
        + ", on the pool's images only.  ",
        f"Fine-tuning: {finetune_length(budget)} of batch {settings.batch_size}, crops "
        f"{settings.crop_size} px, Adam {settings.learning_rate:g} → {settings.final_learning_rate:g} "
        f"cosine (KAF layers at {settings.kaf_learning_rate_scale:g} of it), Dice + CE, augmentation on; "
        f"{budget.draws} draw(s) per M; the annotator's protocol {budget.annotator_steps} steps.  ",
        "Prediction keeps the largest 3D component of each class (the product's default).",
        "",
        f"*{budget.note}*",
        "",
    ]
    for key, results in all_results.items():
        lines.append(dataset_section(results, budget, rows, plots.get(key), md))
    lines += [
        "<details><summary>Each row's runs, its time per stage (s: fine-tuning and scoring summed over the "
        "draws shown, pretraining once), and its pretraining loss terms at the end</summary>",
        "",
    ]
    for key, results in all_results.items():
        for row, row_results in results.rows.items():
            stages = "; ".join(f"{name} {value:.0f}" for name, value in row_results.stage_seconds().items())
            terms = loss_terms(row_results.pretraining_terms)
            ended = f"; pretraining's last tenth of steps: {terms}" if terms else ""
            lines.append(f"- {key} {row} ({'; '.join(row_results.runs)}): {stages}{ended}")
    lines += ["", "</details>", end]
    return "\n".join(lines)


def write_section(path: Path, section: str, markers: tuple[str, str]) -> None:
    """Replace the section of `path` between `markers` (or append it), keeping the rest of the file."""
    start, end = markers
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        text = before + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="interactive preset, about an hour on 2 CPU cores")
    mode.add_argument("--long", action="store_true", help="interactive preset, 320 steps, 3 draws")
    mode.add_argument("--full", action="store_true", help="the paper preset and budgets, for a GPU")
    parser.add_argument("--smoke", action="store_true", help="a few steps of everything (minutes)")
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    parser.add_argument("--rows", nargs="+", choices=list(ALL_ROWS), help="default: the mode's rows")
    parser.add_argument("--draws", type=int, help="default: the mode's (quick 2, long 3, full 5)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="the patient split and the labelled draws")
    parser.add_argument("--write", type=Path, help="also put the results into this markdown file")
    parser.add_argument("--plots", type=Path, help="default: benchmarks/results with --write, else WORK")
    parser.add_argument(
        "--work",
        type=Path,
        help="each row's results, reused by a later run of the same protocol (default /tmp/kaf_<mode>, "
        "e.g. kaf_few_label_long)",
    )
    parser.add_argument("--fresh", action="store_true", help="run every row again, ignoring WORK's results")
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"the data folder {DATA} is absent: this benchmark needs ../shared/data")
    budget = FULL if args.full else LONG if args.long else QUICK
    budget = budget.smoke() if args.smoke else budget
    budget = replace(budget, draws=args.draws) if args.draws else budget
    rows = [ALL_ROWS[key] for key in args.rows] if args.rows else list(budget.rows)
    # Explicit draws or rows get their own section and plots, beside the mode's rather than in their place.
    variant = run_variant(budget, rows, draws_given=args.draws is not None)
    work = args.work or Path("/tmp") / f"kaf_{budget.file_stem}"
    work.mkdir(parents=True, exist_ok=True)
    plots_dir = args.plots or (Path("benchmarks/results") if args.write else work)
    torch.set_num_threads(args.threads)
    print(
        f"few-label benchmark, mode {budget.mode}, preset {budget.preset}, rows {[r.key for r in rows]}, "
        f"M {budget.labelled} x {budget.draws} draws, k {budget.annotated}, pretraining "
        f"{budget.pretrain_steps} steps/stage, fine-tuning {finetune_length(budget)}",
        flush=True,
    )
    all_results, plots = {}, {}
    for key in args.datasets:
        all_results[key] = run_dataset(DATASETS[key], budget, rows, args, work)
        stem = "_".join([budget.file_stem, *slug(variant), key]).replace("-", "_")
        ran = all_results[key].ran(rows)
        plots[key] = plot_dataset(all_results[key], budget, ran, plots_dir / f"{stem}.png")
    md = work / "BENCHMARKS.md"
    markers = budget.markers(args.datasets, variant)
    text = report(all_results, budget, rows, args, plots, args.write or md, variant)
    print(text)
    write_section(md, text, markers)
    if args.write:
        write_section(args.write, text, markers)
    print(f"written: {md}" + (f", {args.write}" if args.write else "") + f"; plots in {plots_dir}")


if __name__ == "__main__":
    main()
