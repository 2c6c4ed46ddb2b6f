"""Data: dataset catalog, the CoOp protocol, the TF-free input pipeline, on-device augmentation.

Typical use (the trainer does this)::

    from jaxprompt import data
    ds = data.load_dataset("OxfordPets", data_dir=..., split_file="split_zhou_OxfordPets.json")
    split, classnames = data.apply_protocol(ds, shots=16, seed=1, subset="base", workdir=workdir)
    train = data.train_iterator(split["train"], ds.fetch, batch_size=32, seed=1)
    batch = data.normalize_batch(next(train))         # on device: CLIP normalisation
    test = data.eval_iterator(split["test"], ds.fetch, batch_size=100)

Batches are dicts of numpy arrays (NHWC). Eval: ``image`` float32 [B,224,224,3] normalised,
``label`` int32 [B], ``mask`` bool [B] (padding in the last batch). Train: ``image`` uint8
[B,224,224,3], already augmented on the host as the reference's torchvision transforms are
(random resized crop of the full-resolution image + flip: ``augment="coop"``; POUF's square
resize first: ``"pouf"``), with Dassl's epochs (a fresh shuffle each epoch, the last partial
batch dropped); ``normalize_batch`` makes it float32 on device.

Custom datasets: ``"folder:/path"`` (class = sub-folder) or ``"csv:/path/file.csv"`` (``path,label``
plus ``classnames.txt``) work anywhere a dataset name does.
"""

# The catalog, the protocol and the toy world load at once: they need only numpy, so a config
# can resolve a dataset name (configs/common.py) without jax. The input pipeline, the
# on-device augmentation and the TFDS builder (jax, grain, dm-pix, PIL) load on first use.
from jaxprompt.data import toyworld
from jaxprompt.data.catalog import (
    DATASETS,
    IMAGENET_A_INDICES,
    IMAGENET_R_INDICES,
    DatasetSpec,
    LoadedDataset,
    apply_protocol,
    canonical_name,
    get_dataset,
    imagenet_classnames,
    load_dataset,
    names,
    register,
)
from jaxprompt.data.folder import FileSource, read_csv, scan_image_folder
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

_LAZY_NAMES = {
    **dict.fromkeys(
        ("augmix", "normalize_batch", "normalize_on_device", "random_flip", "random_resized_crop",
         "tpt_views", "tpt_views_from_crops", "train_augment"),
        "jaxprompt.data.augment",
    ),
    **dict.fromkeys(
        ("CLIP_MEAN", "CLIP_STD", "DataIterator", "TRAIN_AUGMENTS", "canvas_size", "decode_rgb",
         "eval_iterator", "eval_transform", "resized_crop", "sample_crop_box", "to_canvas",
         "train_iterator", "train_view"),
        "jaxprompt.data.pipeline",
    ),
}  # fmt: skip


def __getattr__(name: str):
    import importlib

    if name in ("prepare", "prepare_main"):
        # Importing the submodule binds the package's `prepare` to it; the public name is the
        # function, so both are bound here after the import.
        module = importlib.import_module("jaxprompt.data.prepare")
        globals().update(prepare=module.prepare, prepare_main=module.main)
        return globals()[name]
    if name in _LAZY_NAMES:
        value = getattr(importlib.import_module(_LAZY_NAMES[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'jaxprompt.data' has no attribute {name!r}")


__all__ = [
    "canvas_size",
    # catalog
    "DATASETS",
    "DatasetSpec",
    "IMAGENET_A_INDICES",
    "IMAGENET_R_INDICES",
    "LoadedDataset",
    "apply_protocol",
    "canonical_name",
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
    "TRAIN_AUGMENTS",
    "resized_crop",
    "sample_crop_box",
    "to_canvas",
    "train_iterator",
    "train_view",
    # augmentation (on device)
    "augmix",
    "normalize_batch",
    "normalize_on_device",
    "random_flip",
    "random_resized_crop",
    "tpt_views",
    "tpt_views_from_crops",
    "train_augment",
    # building
    "prepare",
    "prepare_main",
]

# The toy world is part of the catalog (registered here: toyworld builds on the catalog).
toyworld.register_datasets()
