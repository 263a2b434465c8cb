"""Error review in the FiftyOne App: `python -m stages.review [--model M] [--split DIR] [--name N]`.

Not a DVC stage: a command. Loads every crop of a labelled split (default the test split) into a
persistent FiftyOne dataset, one sample per crop with
  ground_truth  fo.Classification (the crop's folder),
  prediction    fo.Classification (label, confidence, logits) from the model,
  correct       bool, and the tag ``mistake`` on the wrong ones,
then prints how to open it (``fiftyone app launch NAME``), or opens it with ``--launch``.
The model is a checkpoint or an exported .onnx file (see stages.predict). No network is needed:
FiftyOne's own database (fiftyone-db's mongod) runs locally.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from stages.common.config.paths import CHECKPOINT, TEST_SPLIT
from stages.common.inference.logits import checked_crops
from stages.common.infra.errors import ArgumentParser, StageError, main_guard
from stages.common.serving.classifiers import load_classifier
from stages.common.serving.predictor import predict_paths

DEFAULT_MODEL = CHECKPOINT
DEFAULT_SPLIT = TEST_SPLIT
DEFAULT_NAME = "perimeter-test"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m stages.review",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                        help=f"checkpoint or .onnx file (default {DEFAULT_MODEL})")
    parser.add_argument("--split", type=Path, default=DEFAULT_SPLIT,
                        help=f"labelled folder <label>/<picture> (default {DEFAULT_SPLIT})")
    parser.add_argument("--name", default=DEFAULT_NAME,
                        help=f"FiftyOne dataset name, replaced if it exists (default {DEFAULT_NAME})")
    parser.add_argument("--launch", action="store_true",
                        help="open the FiftyOne App on the dataset and wait (Ctrl-C to stop)")
    return parser.parse_args(argv)


def build_dataset(model: Path, split: Path, name: str):
    """The FiftyOne dataset of ``split`` with ground truth and ``model``'s predictions."""
    os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")  # never phone home
    import fiftyone as fo

    classifier = load_classifier(model)
    classes = classifier.meta.classes
    # listed only (stream: nothing decoded here); predict_paths reads each picture itself
    folder = checked_crops(split, classifier.meta, model, torch.device("cpu"), keep="stream")
    items = [(Path(path).resolve(), None) for path in folder.paths]  # sorted by ImageFolder
    truth = [classes[t] for t in folder.targets.tolist()]

    samples = []
    for pred, true in zip(predict_paths(classifier, items), truth):
        if pred.error:
            print(f"{pred.path}: skipped, {pred.error}")
            continue
        best = int(pred.probs.argmax())
        label = classes[best]
        samples.append(fo.Sample(
            filepath=str(pred.path),
            tags=[] if label == true else ["mistake"],
            ground_truth=fo.Classification(label=true),
            prediction=fo.Classification(label=label, confidence=float(pred.probs[best]),
                                         logits=[float(v) for v in pred.logits]),
            correct=label == true))
    if not samples:
        raise StageError(f"{split}: no readable pictures; run the split stage first")

    dataset = fo.Dataset(name, overwrite=True, persistent=True)
    dataset.info = {"model": str(model), "arch": classifier.meta.arch, "classes": classes,
                    "split": str(split)}
    dataset.default_classes = classes
    dataset.add_samples(samples, progress=False)
    dataset.save()
    return dataset


@main_guard
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    dataset = build_dataset(args.model, args.split, args.name)
    mistakes = len(dataset.match_tags("mistake"))
    print(f"FiftyOne dataset '{dataset.name}': {len(dataset)} crops from {args.split}, "
          f"{mistakes} mistakes (tag 'mistake'); fields ground_truth, prediction, correct")
    if args.launch:
        import fiftyone as fo

        fo.launch_app(dataset).wait()
    else:
        print(f"open it: fiftyone app launch {dataset.name}   (or rerun with --launch)")


if __name__ == "__main__":
    main()
