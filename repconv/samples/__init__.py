"""Small sample architectures written the ordinary training way, and the recipe for the shipped
sample checkpoints (``python -m repconv.samples.make``). Checkpoints name these builders as
``repconv.samples:repvgg_tiny``."""

from repconv.samples.models import (
    SAMPLES,
    BasicBlock,
    RepVGGBlock,
    RepVGGTiny,
    ResNetTiny,
    SampleSpec,
    build_sample,
    repvgg_tiny,
    resnet_tiny,
)

__all__ = ["SAMPLES", "BasicBlock", "RepVGGBlock", "RepVGGTiny", "ResNetTiny", "SampleSpec",
           "build_sample", "repvgg_tiny", "resnet_tiny"]
