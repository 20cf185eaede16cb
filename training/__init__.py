"""Training, fine-tuning and evaluation of the VideoMAE models (`train.py` is the entry point).

config        the run's schema (dataclasses), load_config, check_config -> DataFacts, model_kind_for, ConfigError
distributed   Dist, setup, all_reduce, gather
build         the parts a run is built from: loader, model, EMA, mixup
trainer       Trainer: the components built once, train_step, log_and_check_stop, run, state_dict / load_state_dict
loss          StepLoss: the step's objective (pretraining loss, or cross-entropy with mixup / cutmix targets)
step          GraphedStep: forward, backward, clipping and AdamW as one CUDA graph
metrics       MetricsLog (console, metrics.jsonl, TensorBoard), peak FLOP/s for MFU
checkpointing run state in checkpoints: RNG capture and restore, --resume (newest intact checkpoint)
optim         AdamW with VideoMAE's parameter groups (layer-wise lr decay); build_optimization (lr rule, schedule)
schedule      the official per-step cosine schedule with linear warmup
evaluate      5 clips x 3 crops evaluation across ranks
"""
