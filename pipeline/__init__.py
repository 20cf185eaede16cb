"""DALI input pipeline: WebDataset video shards -> decoded, sampled, augmented clips as torch tensors.

    from pipeline import build_loader
    loader = build_loader("data/train", "pretrain", batch_size=32, device="gpu", num_repeats=2)
    for batch in loader:                       # one epoch
        video, mask = batch["video"], batch["mask"]

See `pipeline.loader` (epochs, last batch, resume), `pipeline.plan` (the decode plan, several pipelines per rank),
`pipeline.recovery` (corrupt samples), `pipeline.strategy` (what NVDEC reads, decode="auto"), `pipeline.handoff`
(DALI outputs to torch without copies), `pipeline.protocol` (the `Loader` protocol the trainer relies on),
`pipeline.graph` (the DALI graph), `pipeline.config` (options and per-mode defaults), `pipeline.mixup` (mixup/cutmix
for video on the device) and `python -m pipeline.preview` (look at what the model is fed). Names are imported on
first use, so that `pipeline.mixup`, `pipeline.config` or `pipeline.protocol` alone does not load DALI.
"""

import importlib

_EXPORTS = {
    "PipelineConfig": "pipeline.config",
    "VideoLoader": "pipeline.loader",
    "Loader": "pipeline.protocol",
    "LoaderStats": "pipeline.protocol",
    "build_loader": "pipeline.loader",
    "VideoMixup": "pipeline.mixup",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
