"""Typed configuration: every command's dataclass (the CLI, its ``--help`` and the saved ``config.json``).

Configs import only the standard library, tyro and ``usae.errors``, so every stage may import them
and ``usae --help`` starts without torch.
"""

from usae.config.convert import from_json_dict, refuse_invalid, to_json_dict
from usae.config.data import EncodeConfig, SynthConfig, VerifyConfig
from usae.config.evaluate import ClassThresholds, EvalConfig, LabelConfig, SpliceConfig
from usae.config.experiments import AblateConfig, BaselineConfig, DemoConfig, FrontierConfig
from usae.config.explore import ExploreConfig, MaximizeConfig
from usae.config.extract import ExtractConfig
from usae.config.interop import ExportConfig, ImportOfficialConfig
from usae.config.train import Activation, DecoderNorm, Encoder, Normalization, Rule, SAEConfig, TrainConfig

__all__ = [
    "AblateConfig",
    "Activation",
    "BaselineConfig",
    "ClassThresholds",
    "DecoderNorm",
    "DemoConfig",
    "Encoder",
    "EncodeConfig",
    "EvalConfig",
    "ExploreConfig",
    "ExportConfig",
    "ExtractConfig",
    "FrontierConfig",
    "ImportOfficialConfig",
    "LabelConfig",
    "SpliceConfig",
    "MaximizeConfig",
    "Normalization",
    "Rule",
    "SAEConfig",
    "SynthConfig",
    "TrainConfig",
    "VerifyConfig",
    "from_json_dict",
    "refuse_invalid",
    "to_json_dict",
]
