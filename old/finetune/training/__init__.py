"""Components that finetune/train.py assembles: arguments, checks, adapters, the Trainer, plots."""
