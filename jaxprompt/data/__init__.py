"""Data: dataset catalog, the CoOp protocol, the TF-free input pipeline, on-device augmentation.

Typical use (the trainer does this)::

    from jaxprompt import data
    ds = data.load_dataset("OxfordPets", data_dir=..., split_file="split_zhou_OxfordPets.json")
    split, classnames = data.apply_protocol(ds, shots=16, seed=1, subset="base", workdir=workdir)
    train = data.train_iterator(split["train"], ds.fetch, batch_size=32, seed=1)
    batch = data.train_augment(key, next(train))       # on device: RRC + flip + CLIP normalise
    test = data.eval_iterator(split["test"], ds.fetch, batch_size=100)

Batches are dicts of numpy arrays (NHWC). Eval: ``image`` float32 [B,224,224,3] normalised,
``label`` int32 [B], ``mask`` bool [B] (padding in the last batch). Train: ``image`` uint8
[B,C,C,3] raw canvas, ``size`` int32 [B,2], ``label``; ``train_augment`` turns it into a
normalised float32 [B,224,224,3] batch.

Custom datasets: ``"folder:/path"`` (class = sub-folder) or ``"csv:/path/file.csv"`` (``path,label``
plus ``classnames.txt``) work anywhere a dataset name does.
"""

from jaxprompt.data import toyworld
from jaxprompt.data.augment import (
    augmix,
    normalize_on_device,
    random_flip,
    random_resized_crop,
    tpt_views,
    train_augment,
)
from jaxprompt.data.catalog import (
    DATASETS,
    IMAGENET_A_INDICES,
    IMAGENET_R_INDICES,
    DatasetSpec,
    LoadedDataset,
    apply_protocol,
    get_dataset,
    imagenet_classnames,
    load_dataset,
    names,
    register,
)
from jaxprompt.data.folder import FileSource, read_csv, scan_image_folder
from jaxprompt.data.pipeline import (
    CLIP_MEAN,
    CLIP_STD,
    DataIterator,
    canvas_size,
    decode_rgb,
    eval_iterator,
    eval_transform,
    to_canvas,
    train_iterator,
)
from jaxprompt.data.prepare import main as prepare_main
from jaxprompt.data.prepare import prepare
from jaxprompt.data.protocol import (
    Example,
    MatchReport,
    base_new_labels,
    classnames,
    fewshot_filename,
    fingerprint,
    load_split_file,
    make_random_split,
    match_split,
    sample_few_shot,
    save_split,
    split_trainval,
    subsample_classes,
)

__all__ = [
    "canvas_size",
    # catalog
    "DATASETS",
    "DatasetSpec",
    "IMAGENET_A_INDICES",
    "IMAGENET_R_INDICES",
    "LoadedDataset",
    "apply_protocol",
    "get_dataset",
    "imagenet_classnames",
    "load_dataset",
    "names",
    "register",
    # custom datasets
    "FileSource",
    "read_csv",
    "scan_image_folder",
    # protocol
    "Example",
    "MatchReport",
    "base_new_labels",
    "classnames",
    "fewshot_filename",
    "fingerprint",
    "load_split_file",
    "make_random_split",
    "match_split",
    "sample_few_shot",
    "save_split",
    "split_trainval",
    "subsample_classes",
    # pipeline
    "CLIP_MEAN",
    "CLIP_STD",
    "DataIterator",
    "decode_rgb",
    "eval_iterator",
    "eval_transform",
    "to_canvas",
    "train_iterator",
    # augmentation (on device)
    "augmix",
    "normalize_on_device",
    "random_flip",
    "random_resized_crop",
    "tpt_views",
    "train_augment",
    # building
    "prepare",
    "prepare_main",
]

# The toy world is part of the catalog (registered here: toyworld builds on the catalog).
toyworld.register_datasets()
