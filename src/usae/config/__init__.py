"""Typed configuration: every command's dataclass (the CLI, its ``--help`` and the saved ``config.json``).

Configs import only the standard library, tyro and ``usae.errors``, so every stage may import them
and ``usae --help`` starts without torch.
"""

from usae.config.convert import from_json_dict, refuse_invalid, to_json_dict
from usae.config.stages import (
    Activation,
    DecoderNorm,
    DemoConfig,
    Encoder,
    EvalConfig,
    ExploreConfig,
    ExtractConfig,
    MaximizeConfig,
    Normalization,
    Rule,
    SAEConfig,
    SynthConfig,
    TrainConfig,
)
from usae.config.tools import (
    AblateConfig,
    BaselineConfig,
    EncodeConfig,
    ExportConfig,
    ImportOfficialConfig,
    LabelConfig,
    SpliceConfig,
    VerifyConfig,
)

__all__ = [
    "AblateConfig",
    "Activation",
    "BaselineConfig",
    "DecoderNorm",
    "DemoConfig",
    "Encoder",
    "EncodeConfig",
    "EvalConfig",
    "ExploreConfig",
    "ExportConfig",
    "ExtractConfig",
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
