"""The Stable Alignment loss at its contract path (DESIGN §3): ``from services.trainer.loss import
stable_alignment_loss``. The code lives in the training library (``stablealign/training/loss.py``),
which the trainer's GPU pods and the command line run; this module only keeps the published import path.
"""

from stablealign.training.loss import (  # noqa: F401 - re-exported
    IGNORE_INDEX,
    batch_response_losses,
    model_takes_logits_to_keep,
    per_response_token_loss,
    stable_alignment_loss,
    stable_alignment_loss_parts,
)

__all__ = ["IGNORE_INDEX", "batch_response_losses", "model_takes_logits_to_keep", "per_response_token_loss",
           "stable_alignment_loss", "stable_alignment_loss_parts"]
