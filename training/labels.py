"""Labels outside the model's classes are refused before training (`training.config.check_config`).

A label >= the classifier's class count used to crash fine-tuning after its first step (an IndexError inside the
loss or mixup's one-hot), and a short class count (model.num_classes=1 on 2-class data) did the same. The class list
of the manifest catches the second; the first needs the labels themselves: every sample's `KEY.info` member (12 bytes,
found through the index files) is read once, before any compute.
"""

from __future__ import annotations

import os

from pipeline.shardset import ShardSet
from shards import format as fmt


def label_problem(shards: ShardSet, num_classes: int) -> str | None:
    """The first sample of `shards` whose label is outside [0, num_classes), as one line naming the tar, the member
    and the label; None when every label fits (or a sample has no readable info member: the loader skips those)."""
    info_size = 4 * len(fmt.INFO_FIELDS)
    for tar in shards.tars:
        fd = os.open(tar, os.O_RDONLY | os.O_CLOEXEC)
        try:
            for sample in shards.index(tar)[1]:
                info = sample.components.get(fmt.INFO_EXT)
                if info is None or info[1] != info_size:
                    continue
                label = fmt.unpack_info(os.pread(fd, info_size, info[0]))["label"]
                if not 0 <= label < num_classes:
                    fits = f"model.num_classes={num_classes} (labels 0..{num_classes - 1})"
                    return f"{tar}: {info[2]} holds label {label}, outside {fits}"
        finally:
            os.close(fd)
    return None
