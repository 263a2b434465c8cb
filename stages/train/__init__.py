"""Stage ``train``: the report's recipe on data/split/{train,val} (``python -m stages.train``).

    stage.py        the stage, top to bottom: main, run, load_splits, build, epoch, ...
    recipe.py       focal loss, the cosine schedule, early stopping
    data.py         seeding, and data order / augmentation as functions of (seed, epoch, crop)
    state.py        data/train_resume/<key>.pt: what a killed run resumes from
    distributed.py  several processes under torchrun (DDP); one process never enters it
"""
