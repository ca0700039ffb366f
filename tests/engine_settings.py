"""Config overrides shared by the engine tests (train, eval, DDP) and the session fixtures in conftest.py."""

# small and fast: 8 frames of 32 px (the synthetic clips are 64 px), 2 test views
FAST = ["data.crop_size=32", "data.train_short_side=[32,36]", "data.test_short_side=32", "data.test_crop_size=32",
        "data.num_clips=2", "data.num_crops=1", "data.num_workers=0", "train.log_every=1"]
# fit 12 clips quickly (no augmentation noise, AdamW): the loss must clearly go down in 16 steps
FIT = ["train.epochs=8", "train.batch_size=6", "model.dropout=0.0", "optim.optimizer=adamw", "optim.lr=0.003",
       "optim.weight_decay=0.0", "data.flip=false", "data.train_short_side=[32,32]", "optim.warmup_epochs=0.5"]
