"""Images from a tensorflow-datasets dataset already prepared in a local directory (never downloaded).

The dataset is opened with ``tfds.builder_from_directory(dataset_dir)`` (the version directory, e.g.
``~/tensorflow_datasets/cifar10/3.0.2``), never by name: loading by name may try to download. The split
is read once, record by record with checksums verified (a corrupt record is skipped alone and named in a
warning), with image decoding skipped, so the dataset holds the encoded image bytes (a few KB each)
and decodes one image per ``__getitem__``: random access without holding decoded pixels.
TensorFlow is kept off GPUs and its thread pools are capped, so it does not compete with PyTorch.
"""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from worldmodel.data.folders import SkipCounter, resize_center_crop
from worldmodel.data.tfrecords import CorruptRecords, record_dataset

log = logging.getLogger(__name__)


def import_tf_quietly(threads: int = 1):
    """Import tensorflow + tensorflow_datasets with GPUs hidden from TF and at most ``threads`` threads."""
    try:
        import tensorflow as tf
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise ImportError("reading TFDS datasets needs tensorflow and tensorflow-datasets: "
                          "pip install -e .[rt1]") from err
    try:
        tf.config.set_visible_devices([], "GPU")
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:  # TF already initialised by someone else: its settings stand
        log.debug("TensorFlow already initialised; device and thread settings left as they are")
    return tf, tfds


class TFDSImages(SkipCounter, Dataset):
    """Map-style images from a prepared TFDS dataset directory.

    dataset_dir: the prepared version directory (holds ``dataset_info.json``).
    image_key: the image feature; caption_key: a ClassLabel (caption = class name, also the categorical
    label ``caption_key``), a Text/bytes feature (caption as is), or None (empty captions).
    max_examples: read at most this many examples of the split (None = all).
    """

    def __init__(
        self,
        dataset_dir: str | Path,
        split: str = "train",
        image_key: str = "image",
        caption_key: str | None = None,
        size: int = 32,
        max_examples: int | None = None,
    ):
        path = Path(dataset_dir).expanduser()
        if not (path / "dataset_info.json").is_file():
            raise FileNotFoundError(
                f"{path} is not a prepared TFDS dataset directory (no dataset_info.json); point dataset_dir at the "
                "version directory, e.g. ~/tensorflow_datasets/cifar10/3.0.2, prepared beforehand with "
                "`tfds build` or download_and_prepare")
        tf, tfds = import_tf_quietly()
        builder = tfds.builder_from_directory(str(path))
        features = builder.info.features
        for key in (image_key, caption_key):
            if key is not None and key not in features:
                raise ValueError(f"feature {key!r} not in {path}; its features are {sorted(features.keys())}: "
                                 "set image_key / caption_key to one of them")
        if split not in builder.info.splits:
            raise ValueError(f"split {split!r} not in {path}; available: {sorted(builder.info.splits.keys())}")
        self.size, self.path, self.split = int(size), path, split
        self._init_skips()
        caption_feature = features[caption_key] if caption_key else None
        is_class = isinstance(caption_feature, tfds.features.ClassLabel)
        self._class_names = tuple(caption_feature.names) if is_class else None
        decoders = {image_key: tfds.decode.SkipDecoding()}
        self.corrupt = CorruptRecords()  # records failing their checksum: skipped one by one, named in a warning
        if builder.info.file_format == tfds.core.FileFormat.TFRECORD:
            info = builder.info.splits[split]
            lengths = [int(n) for n in info.shard_lengths]
            ds = record_dataset(tf, [str(p) for p in info.filepaths], lengths, self.corrupt, cycle_length=1)
            ds = ds.map(lambda i, record: features.deserialize_example(record, decoders=decoders))
        else:  # another file format (array_record): tfds reads it
            ds = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders)
        self.images: list[bytes] = []
        self.captions: list[str] = []
        self.classes: list[int] = []
        for example in tfds.as_numpy(ds):
            if max_examples is not None and len(self.images) >= max_examples:
                break
            self.images.append(bytes(example[image_key]))
            value = example[caption_key] if caption_key else None
            if self._class_names is not None:
                self.classes.append(int(value))
                self.captions.append(self._class_names[int(value)])
            elif value is None:
                self.captions.append("")
            else:
                self.captions.append(value.decode("utf-8") if isinstance(value, bytes) else str(value))
        if self.corrupt.per_file:
            lost = sum(len(v) for v in self.corrupt.per_file.values())
            warnings.warn(f"TFDSImages: skipped {lost} corrupt record(s) of split {split!r} (failed checksum: "
                          f"{self.corrupt.describe()})", stacklevel=2)
        if not self.images:
            raise ValueError(f"split {split!r} of {path} has no examples; pick another split or re-prepare the dataset")
        self.caption_key = caption_key
        self.label_names = (caption_key,) if self._class_names else ()
        self.num_classes = {caption_key: len(self._class_names)} if self._class_names else {}
        self.class_names = {caption_key: self._class_names} if self._class_names else {}

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        from PIL import Image

        n = len(self.images)
        for attempt in range(n):
            i = (index + attempt) % n
            try:
                with Image.open(io.BytesIO(self.images[i])) as img:
                    image = resize_center_crop(img, self.size)
            except Exception as err:  # noqa: BLE001 - any decoder failure means "unreadable example"
                self._skip(Path(f"{self.path}[{self.split}][{i}]"), err)
                continue
            labels = {self.caption_key: self.classes[i]} if self._class_names else {}
            return {"image": torch.from_numpy(np.ascontiguousarray(image)), "caption": self.captions[i],
                    "labels": labels}
        raise ValueError(f"none of the {n} images in {self.path} split {self.split!r} could be decoded")
