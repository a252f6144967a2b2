"""Face-recognition backbones. Each returns the embedding from ``forward`` and exposes
``forward_features(x) -> (embedding, final conv map)`` plus ``embedding_size``, ``feature_channels``,
``input_size`` (h, w) and ``feature_size`` (h, w of the final conv map); ``base.Backbone`` provides
these on top of each net's ``feature_map`` and ``embed``."""

from facepipe.models.backbones.iresnet import IRESNET_LAYERS, IResNet, iresnet
from facepipe.models.backbones.mobilefacenet import MobileFaceNet, mobilefacenet
from facepipe.models.backbones.sphereface import SPHERE_UNITS, SFNet, sfnet

__all__ = [
    "IRESNET_LAYERS",
    "IResNet",
    "MobileFaceNet",
    "SFNet",
    "SPHERE_UNITS",
    "iresnet",
    "mobilefacenet",
    "sfnet",
]
