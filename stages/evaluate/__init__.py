"""Stage ``evaluate``: the best checkpoint on the held-out test split (``python -m stages.evaluate``).

    stage.py    the stage: scores, speed, metrics/eval.json, plots/eval/
    figures.py  the PNG figures: confusion matrix, learning curves, most confident mistakes
"""
