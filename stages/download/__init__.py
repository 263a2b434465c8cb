"""Stage ``download``: ``data/raw/`` in the Open Images V7 layout (``python -m stages.download``).

    stage.py        the stage: the source switch, normalising a zoo split or a mirror, metrics
    sample_data.py  the ``sample`` source: a synthetic set drawn in the Open Images layout
    zoo.py          the ``open-images-v7`` source: FiftyOne's zoo, bounded in time, resumable
"""
