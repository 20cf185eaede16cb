"""VideoMAE ViT (S/B/L/H) for masked pretraining and video classification.

    from model import VideoMAEConfig, build_model, load_pretrained
    cfg = VideoMAEConfig.from_name("base")
    m = build_model("pretrain", cfg)            # m(video, mask) -> (loss, pred)
    c = load_pretrained("videomae-base-finetuned-kinetics/")   # c(video) -> logits, c.class_names

Layouts: video float[B, C, T, H, W] (ImageNet-normalized), mask bool[B, N] with N = T/2 * H/16 * W/16 tokens in
(t, h, w) order, True = masked.
"""

from . import flops
from .config import VideoMAEConfig
from .loading import CHECKPOINT_FORMAT, CheckpointError, build_model, load_pretrained
from .videomae import VideoMAEClassifier, VideoMAEPretrain

__all__ = [
    "VideoMAEConfig",
    "VideoMAEPretrain",
    "VideoMAEClassifier",
    "build_model",
    "load_pretrained",
    "CheckpointError",
    "CHECKPOINT_FORMAT",
    "flops",
]
