"""KAF UNet: backbone, KAF layer and presets."""

from kaf.models.config import PRESETS, ModelConfig, Preset, preset_config
from kaf.models.unet import KafOutput, KafUNet, count_parameters

__all__ = ["PRESETS", "KafOutput", "KafUNet", "ModelConfig", "Preset", "count_parameters", "preset_config"]
