"""The one place the project touches FiftyOne's private names (tests/test_layout.py keeps it so).

FiftyOne's public Open Images download (``fiftyone.zoo.download_zoo_dataset``) is the download
path; its public API has no timeout, no resume, no check that a file on disk is whole, and no
progress other than its own bar on stdout. zoo.py adds those by standing in for four pieces of
fiftyone.utils.openimages / fiftyone.utils.aws while the download runs (:func:`hooked`), and
the stage needs the URL of the class list, which FiftyOne keeps in a private table
(:func:`class_list_url`; the public ``get_classes`` fetches it into a temporary folder when the
zoo folder lacks it, and swallows every error on the way). What it uses, in FiftyOne 1.22.1:

- ``_download_file_if_necessary(filepath, url, is_zip, quiet, download)``: fetches every label
  and metadata file (eta's ``download_file``: no timeout, written in place);
- ``_download_images_if_necessary(image_ids, split, dataset_dir, num_workers, download)``: a
  split's chosen images, through ``fiftyone.utils.aws.download_public_s3_files``;
- ``_get_downloaded_image_ids(dataset_dir)``: the images on disk, which FiftyOne puts first
  when it draws the images to fetch;
- the ``boto3`` module that fiftyone.utils.aws calls ``boto3.client`` on;
- ``_ANNOTATION_DOWNLOAD_URLS``: the label-file URLs, by split and kind.

:data:`FIFTYONE` declares them; :func:`hooked` refuses in one line (``internals.require``) on
another FiftyOne than the pinned one, or on one that lacks any of them with these parameters.
"""
from __future__ import annotations

import contextlib
import functools
import types
from typing import Any, Callable, Iterator

from stages.common.infra.internals import Library, Private, require

OPENIMAGES = "fiftyone.utils.openimages"
FIFTYONE = Library(
    dist="fiftyone", pinned="1.22.1", adapter="stages/download/fiftyone_internals.py",
    needs=(
        Private(OPENIMAGES, "_download_file_if_necessary",
                params=("filepath", "url", "is_zip", "quiet", "download")),
        Private(OPENIMAGES, "_download_images_if_necessary",
                params=("image_ids", "split", "dataset_dir", "num_workers", "download")),
        Private(OPENIMAGES, "_get_downloaded_image_ids", params=("dataset_dir",)),
        Private("fiftyone.utils.aws", "boto3", is_a=types.ModuleType),
        Private(OPENIMAGES, "_ANNOTATION_DOWNLOAD_URLS", is_a=dict),
    ),
    instead="use a local copy (data.source: mirror)")


def label_urls() -> dict[str, Any]:
    """FiftyOne's table of Open Images label-file URLs (split or ``general``, then kind): the
    table itself, which FiftyOne reads at each fetch."""
    require(FIFTYONE, "_ANNOTATION_DOWNLOAD_URLS")   # also inside hooked(), with its stand-ins
    import fiftyone.utils.openimages as fouo
    return fouo._ANNOTATION_DOWNLOAD_URLS


def class_list_url() -> str:
    """Where FiftyOne fetches the class list (``metadata/classes.csv``) from."""
    return label_urls()["general"]["class_names"]


@contextlib.contextmanager
def hooked(label_file: Callable[..., bool], images: Callable[..., int],
           on_disk: Callable[[str], list[str]], s3: Any) -> Iterator[None]:
    """For the ``with`` block, FiftyOne's Open Images download calls

    - ``label_file(original, filepath, url, is_zip=, quiet=, download=)`` for each label or
      metadata file, and ``images(original, image_ids, split, dataset_dir, num_workers=,
      download=)`` for a split's images (``original``: FiftyOne's own function, for what the
      hook hands back to it);
    - ``on_disk(dataset_dir)`` for the IDs of the images already downloaded;
    - ``s3.client(...)`` where it would call ``boto3.client(...)``.

    Everything is put back when the block ends, however it ends.
    """
    require(FIFTYONE)
    import fiftyone.utils.aws as foua
    import fiftyone.utils.openimages as fouo

    swaps = [(fouo, "_download_file_if_necessary",
              functools.partial(label_file, fouo._download_file_if_necessary)),
             (fouo, "_download_images_if_necessary",
              functools.partial(images, fouo._download_images_if_necessary)),
             (fouo, "_get_downloaded_image_ids", on_disk),
             (foua, "boto3", s3)]
    saved = [(module, name, getattr(module, name)) for module, name, _ in swaps]
    for module, name, value in swaps:
        setattr(module, name, value)
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
