"""Score a model on a tokenized split: summed response-token loss and token counts per category."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from unitedllm.training.data import IGNORE_INDEX, CausalCollator

if TYPE_CHECKING:
    from datasets import Dataset

__all__ = ["response_losses"]


def response_losses(
    model: Any, dataset: Dataset, *, batch_size: int, pad_token_id: int
) -> dict[str, tuple[float, int]]:
    """``{category: (summed loss over response tokens, number of response tokens)}`` in dataset order."""
    import torch
    import torch.nn.functional as F

    collate = CausalCollator(pad_token_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums: dict[str, tuple[float, int]] = {}
    try:
        with torch.no_grad():
            for start in range(0, len(dataset), batch_size):
                rows = dataset[start : start + batch_size]
                features = [
                    {"input_ids": ids, "labels": labels}
                    for ids, labels in zip(rows["input_ids"], rows["labels"], strict=True)
                ]
                batch = collate(features)
                logits = model(
                    input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
                ).logits
                # Token t predicts token t+1; loss only where the target is a response token. Row by row,
                # and only over the counted positions: the float32 copy is one row's responses, not the
                # whole batch × sequence × vocabulary again.
                targets = batch["labels"][:, 1:].to(device)
                counted = targets != IGNORE_INDEX
                for i, category in enumerate(rows["category"]):
                    keep = counted[i]
                    loss = F.cross_entropy(logits[i, :-1][keep].float(), targets[i][keep], reduction="sum")
                    s, n = sums.get(category, (0.0, 0))
                    sums[category] = (s + float(loss), n + int(keep.sum()))
                del logits
    finally:
        model.train(was_training)
    return sums
