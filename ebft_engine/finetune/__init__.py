"""Recovery by fine-tuning: EBFT's block trainer."""
from .ebft import TrainResult, batch_mse, finetune_block

__all__ = ["TrainResult", "batch_mse", "finetune_block"]
