"""Converters of public segmentation datasets into segray datasets.

``CONVERTERS`` maps the format word of ``jobs/prepare_data.py <format> <src> <dst>`` to its
:class:`Converter`. Each reads the dataset's standard layout, applies its label convention at
conversion time (recorded in the manifest's provenance) and writes shards, then the manifest.

========== ===================================================== ============================
format     source layout                                         splits
========== ===================================================== ============================
voc        VOC2012 (+ SegmentationClassAug / SBD cls/*.mat)       train|train_aug|train_labeled
                                                                  (+ unlabeled), val
cityscapes leftImg8bit + gtFine (labelIds -> 19 trainIds)          train, val
ade20k     ADEChallengeData2016 (reduce_zero_label)              train, val
cocostuff10k MMSeg images/annotations {train,test}2014 or .mat    train, val (= test2014)
glas       UCTransNet train|test/img|labelcol (binary)           train, val (= test)
kvasir     PraNet TrainDataset + TestDataset/<set> (binary)       train, val, test_<set>
nyudv2     MaskSup {train,val}_{images,labels} (40 classes)       train, val
========== ===================================================== ============================

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser()
    >>> add_common_arguments(parser); CONVERTERS["voc"].add_arguments(parser)
    >>> args = parser.parse_args(["--labeled-list", "366.txt"])
    >>> info = CONVERTERS["voc"].convert("/data/VOCdevkit", "/data/voc_366", args)  # doctest: +SKIP
"""

from __future__ import annotations

from segray.data.converters import ade20k, cityscapes, cocostuff10k, glas, kvasir, nyudv2, voc
from segray.data.converters.common import Converter, OptionError, add_common_arguments

CONVERTERS: dict[str, Converter] = {
    m.CONVERTER.name: m.CONVERTER
    for m in (voc, cityscapes, ade20k, cocostuff10k, glas, kvasir, nyudv2)
}

__all__ = ["CONVERTERS", "Converter", "OptionError", "add_common_arguments"]
