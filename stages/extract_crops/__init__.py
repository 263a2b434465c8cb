"""Stage ``extract_crops``: labelled square crops of every wanted box (``python -m stages.extract_crops``).

    stage.py   the stage: planning from the CSVs, cutting in worker processes, counting skips
    dedup.py   near-duplicate boxes of one object (Person and Man on one body) counted once
"""
