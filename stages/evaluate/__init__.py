"""Stage ``evaluate``: the best checkpoint on the held-out test split (``python -m stages.evaluate``).

    stage.py    the stage: scores (metrics/eval.json), speed (metrics/speed/), plots/eval/
    figures.py  the PNG figures: confusion matrix, learning curves, most confident mistakes
"""
