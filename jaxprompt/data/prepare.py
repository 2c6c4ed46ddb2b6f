"""``jaxprompt prepare``: build a dataset once, as array_record, for TF-free reading.

* Catalog entries backed by a TFDS builder call ``download_and_prepare(file_format=
  "array_record")``; TFDS needs TensorFlow for that (``pip install jaxprompt[prepare]``).
* Entries TFDS lacks or breaks (FGVCAircraft, UCF101 mid-frames, StanfordCars from the original
  archives) and custom ``folder:``/``csv:`` datasets are written by a small builder that stores
  the original encoded image bytes, the CoOp label and the relative path (``key``). It needs no
  TensorFlow.

Afterwards the record-key index is built once (``jaxprompt_index.json`` beside the data), so
loading never scans the records again.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import types
from collections.abc import Sequence

from jaxprompt.data import catalog
from jaxprompt.data.protocol import Split

log = logging.getLogger(__name__)


def _write_examples(
    name: str,
    split: Split,
    classnames: Sequence[str],
    root: str,
    data_dir: str,
    version: str = "1.0.0",
) -> str:
    """Writes ``split`` as an array_record TFDS dataset ``name`` (no TensorFlow needed)."""
    import tensorflow_datasets as tfds

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"jaxprompt image dataset built from {root}",
            features=tfds.features.FeaturesDict(
                {
                    # Stored as the original encoded bytes; decoding happens at read time with PIL.
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "label": tfds.features.ClassLabel(names=list(classnames)),
                    "key": tfds.features.Text(),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {s: self._generate_examples(items) for s, items in split.items() if items}

    def _generate_examples(self, items):
        for x in items:
            with open(os.path.join(root, x.key), "rb") as f:
                data = f.read()
            yield x.key, {"image": data, "label": x.label, "key": x.key}

    def body(ns):
        ns.update(
            name=name,
            VERSION=tfds.core.Version(version),
            _info=_info,
            _split_generators=_split_generators,
            _generate_examples=_generate_examples,
        )

    # A class per dataset (TFDS derives paths from the class's `name`); not registered globally.
    cls = types.new_class(
        "JaxpromptImages", (tfds.core.GeneratorBasedBuilder,), {"skip_registration": True}, body
    )
    builder = cls(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return os.fspath(builder.data_path)


class NothingToPrepare(Exception):
    """The dataset needs no preparation (the toy world is rendered when a run loads it)."""


def prepare(
    name: str,
    *,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    classnames: str | None = None,
) -> str:
    """Builds dataset ``name`` as array_record under ``data_dir``.

    Args:
      name: catalog name/alias, ``"folder:PATH"`` or ``"csv:PATH"``.
      data_dir: TFDS data dir (default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
      manual_dir: manually downloaded files (ImageNet tars, Cars archives, FGVC, UCF mid-frames).
      classnames: class-names file for ``csv:`` datasets.

    Returns:
      The directory of the prepared dataset.

    Raises:
      FileNotFoundError: manual files are needed; the message says which go where.
      ImportError: TensorFlow is needed (TFDS-backed builders) and missing.
    """
    spec = catalog.get_dataset(name)
    if spec.generator is not None:
        raise NothingToPrepare(
            f"{spec.name} is generated in memory when a run loads it: nothing to prepare"
        )
    data_dir = catalog._default_data_dir(data_dir)
    if spec.custom is not None or (spec.lister is not None and (manual_dir or not spec.tfds)):
        if spec.custom is not None:
            kind, path = spec.custom
            if kind == "folder":
                split, names = catalog.folder_lib.scan_image_folder(path)
                root = path
            else:
                split, names = catalog.folder_lib.read_csv(path, classnames=classnames)
                root = os.path.dirname(path)
        else:
            if manual_dir is None:
                raise FileNotFoundError(f"{spec.name}: {spec.manual}")
            root, split, names = spec.lister(manual_dir)
        out = _write_examples(spec.prepared_name, split, names, root, data_dir)
    else:
        import importlib.util

        if importlib.util.find_spec("tensorflow") is None:
            # TFDS's builders decode and write with TensorFlow: say so before anything starts.
            raise ImportError(
                f"building {spec.name} from TFDS ({spec.tfds}) needs TensorFlow: "
                "pip install 'jaxprompt[prepare]'"
                + (", or give its files with --manual_dir" if spec.lister is not None else "")
            )
        import tensorflow_datasets as tfds

        kwargs = {}
        if manual_dir:
            kwargs["download_config"] = tfds.download.DownloadConfig(manual_dir=manual_dir)
        try:
            builder = tfds.builder(spec.tfds, data_dir=data_dir, file_format="array_record")
            builder.download_and_prepare(**kwargs)
        except ModuleNotFoundError as e:
            raise ImportError(
                f"building {spec.tfds} needs TensorFlow: pip install 'jaxprompt[prepare]' ({e})"
            ) from e
        except AssertionError as e:  # TFDS raises this when manual files are missing
            raise FileNotFoundError(f"{spec.name}: {spec.manual or e}") from e
        out = str(builder.data_path)
    # Build and cache the key index now, while the user expects the wait.
    loaded = catalog.load_dataset(spec, data_dir=data_dir)
    counts = {s: len(v) for s, v in loaded.split.items()}
    log.info("prepared %s at %s: %s, %d classes", spec.name, out, counts, len(loaded.classnames))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for ``jaxprompt prepare`` (the CLI forwards its arguments here)."""
    parser = argparse.ArgumentParser(prog="jaxprompt prepare", description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", help="catalog name, folder:PATH or csv:PATH")
    parser.add_argument("--data_dir", default=None, help="TFDS data dir (~/tensorflow_datasets)")
    parser.add_argument("--manual_dir", default=None, help="manually downloaded files")
    parser.add_argument("--classnames", default=None, help="class-names file for csv: datasets")
    parser.add_argument("--list", action="store_true", help="list catalog datasets and exit")
    args = parser.parse_args(argv)
    if args.list or not args.dataset:
        for spec in catalog.DATASETS.values():
            where = spec.tfds or "raw files (--manual_dir)"
            print(f"{spec.name:22s} {spec.num_classes:5d} classes  {where}")
        return 0
    try:
        path = prepare(
            args.dataset,
            data_dir=args.data_dir,
            manual_dir=args.manual_dir,
            classnames=args.classnames,
        )
    except NothingToPrepare as e:
        print(e)
        return 0
    except (FileNotFoundError, ImportError, KeyError, ValueError) as e:
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        print(f"jaxprompt: error: {msg}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
