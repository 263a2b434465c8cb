"""Stage ``conditions``: the person alarm under camera conditions (``python -m stages.conditions``).

    corrupt.py  the conditions: each corrupted crop a pure function of (seed, condition,
                severity, crop)
    measure.py  the figures of the alarm on labelled crops under each condition, with bounds
    stage.py    the stage: the test split, metrics/conditions.json, plots/conditions/
"""
