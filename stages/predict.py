"""Classify pictures: `python -m stages.predict PATH... [--model M] [--format F] [--top-k K]`.

Not a DVC stage: the operator's command. PATH is a picture or a folder (walked recursively, image
suffixes only, sorted). Each picture is prepared as training crops are (aspect kept, padded with
the corner colour), centred, so the answer never changes between runs. The model is a train-stage
checkpoint (PyTorch) or an exported ``.onnx`` file (ONNX Runtime); either carries its own arch,
class names, image size and normalisation. No network is touched.

A file that cannot be read gets its own line (``error: ...``) and the rest go on. Exit code: 0 all
classified, 1 some file failed, 2 the model or an option is unusable.
"""
from __future__ import annotations

import argparse
import csv
import json
import signal
import sys
from pathlib import Path

from stages.common.params import ParamError, main_guard
from stages.common.predictor import Prediction, expand, load_classifier, predict_paths

DEFAULT_MODEL = Path("data/model/best.pt")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stages.predict", description=__doc__.split(
        "\n")[0])
    parser.add_argument("paths", nargs="+", metavar="PATH", help="picture files or folders")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                        help=f"checkpoint (.pt) or exported .onnx file (default {DEFAULT_MODEL})")
    parser.add_argument("--format", choices=["table", "json", "csv"], default="table")
    parser.add_argument("--top-k", type=int, default=None,
                        help="classes listed per picture in the table, best first (default all)")
    parser.add_argument("--batch-size", type=int, default=32, help="pictures per forward pass")
    return parser.parse_args(argv)


def ranked(pred: Prediction, classes: list[str], k: int) -> list[tuple[str, float]]:
    order = sorted(range(len(classes)), key=lambda i: (-pred.probs[i], i))
    return [(classes[i], float(pred.probs[i])) for i in order[:k]]


def as_record(pred: Prediction, classes: list[str], k: int) -> dict:
    if pred.error:
        return {"path": str(pred.path), "error": pred.error}
    top = ranked(pred, classes, k)
    return {"path": str(pred.path), "label": top[0][0], "probability": round(top[0][1], 6),
            "probabilities": {c: round(float(p), 6) for c, p in zip(classes, pred.probs)},
            "top_k": [{"label": c, "probability": round(p, 6)} for c, p in top]}


def write_table(preds, classes, k, out) -> None:
    width = max([len("file")] + [len(str(p.path)) for p in preds])
    out.write(f"{'file':<{width}}  {'label':<8} {'prob':>6}  top-{k}\n")
    for p in preds:
        if p.error:
            out.write(f"{str(p.path):<{width}}  error: {p.error}\n")
            continue
        top = ranked(p, classes, k)
        listing = ", ".join(f"{c} {v:.4f}" for c, v in top)
        out.write(f"{str(p.path):<{width}}  {top[0][0]:<8} {top[0][1]:6.4f}  {listing}\n")


def write_csv(preds, classes, out) -> None:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["path", "label", "probability", *classes, "error"])
    for p in preds:
        if p.error:
            writer.writerow([p.path, "", "", *[""] * len(classes), p.error])
        else:
            best = int(p.probs.argmax())
            writer.writerow([p.path, classes[best], f"{p.probs[best]:.6f}",
                             *[f"{v:.6f}" for v in p.probs], ""])


@main_guard
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.batch_size < 1:
        raise ParamError(f"--batch-size={args.batch_size} is not allowed; expected >= 1")
    classifier = load_classifier(args.model)
    classes = classifier.meta["classes"]
    if args.top_k is not None and args.top_k < 1:
        raise ParamError(f"--top-k={args.top_k} is not allowed; expected 1 to {len(classes)}")
    k = min(args.top_k or len(classes), len(classes))

    preds = list(predict_paths(classifier, expand(args.paths), args.batch_size))
    if args.format == "table":
        write_table(preds, classes, k, sys.stdout)
    elif args.format == "csv":
        write_csv(preds, classes, sys.stdout)
    else:
        json.dump({"model": str(args.model), "arch": classifier.meta["arch"], "classes": classes,
                   "predictions": [as_record(p, classes, k) for p in preds]},
                  sys.stdout, indent=2)
        sys.stdout.write("\n")
    failed = sum(p.error is not None for p in preds)
    if failed:
        print(f"{failed} of {len(preds)} inputs failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    # `predict ... | head` closes the pipe early: end quietly, as Unix tools do.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
