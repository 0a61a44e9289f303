"""Training on transformers' Trainer: VLM-only, stage 1 and stage 2, resumable and multi-process."""
