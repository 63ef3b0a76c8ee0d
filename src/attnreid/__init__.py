"""attnreid: person re-identification with attention (MHSA-Net, HA-CNN)."""

from attnreid.errors import AttnReidError, CheckpointError, ConfigError, DataError

__version__ = "0.1.0"

__all__ = ["AttnReidError", "CheckpointError", "ConfigError", "DataError", "__version__"]


def __getattr__(name):
    # Heavy objects are imported lazily so `import attnreid` stays fast.
    if name == "FeatureExtractor":
        from attnreid.deploy.extractor import FeatureExtractor

        return FeatureExtractor
    raise AttributeError(f"module 'attnreid' has no attribute {name!r}")
