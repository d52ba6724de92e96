"""The module's inputs and settings as a parameter node: they live in the scene, so saving the scene saves
them and loading it restores them. Widgets are bound to them through the `SlicerParameterName` property
in Resources/UI/KAFSegment.ui; the logic reads them (`KafLogic.finetune_with` and friends)."""

from pathlib import Path
from typing import Annotated

from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, Minimum, WithinRange, parameterNodeWrapper

from .command import DEVICES, PRESETS, SHIPPED_PRESET

MAX_STEPS = 100_000
MAX_TIME_BUDGET_S = 86_400.0
ATTENTION_LEVELS = (1, 4)  # the KAF UNet's attention levels, finest to coarsest
ATTENTION_HEADS = (0, 3)


@parameterNodeWrapper
class KAFSegmentParameterNode:
    """
    inputVolume: the scan to segment.
    annotation, annotationSegment: the segmentation painted on a few slices, and its selected segment's ID.
    onlySelectedSegment: fine-tune on annotationSegment alone, against background.
    startCheckpoint: weights to start fine-tuning from; "." (an empty field): the shipped ones.
    preset, device, steps, timeBudget (seconds, 0: none): how to fine-tune.
    predictAfterFinetune: predict the whole volume once fine-tuning has finished.
    modelsFolder: where fine-tuned models are saved; a relative folder is inside the scene's folder, so the
        default "." saves them beside the scene file.
    model: the model Predict and Explain use: the last one fine-tuned, or one the user chose.
    outputSegmentation: receives the prediction; None: a new segmentation.
    explainSlice, keypoint, attentionLevel, attentionHead: what "Keypoints and attention" shows.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    annotation: vtkMRMLSegmentationNode
    annotationSegment: str = ""
    onlySelectedSegment: bool = False
    startCheckpoint: Path
    preset: Annotated[str, Choice(PRESETS)] = SHIPPED_PRESET
    device: Annotated[str, Choice(DEVICES)] = "auto"
    steps: Annotated[int, WithinRange(1, MAX_STEPS)] = 150
    timeBudget: Annotated[float, WithinRange(0.0, MAX_TIME_BUDGET_S)] = 0.0
    predictAfterFinetune: bool = True
    modelsFolder: Path
    model: Path
    outputSegmentation: vtkMRMLSegmentationNode
    explainSlice: Annotated[int, Minimum(0)] = 0
    keypoint: Annotated[int, Minimum(0)] = 0
    attentionLevel: Annotated[int, WithinRange(*ATTENTION_LEVELS)] = 1
    attentionHead: Annotated[int, WithinRange(*ATTENTION_HEADS)] = 0
