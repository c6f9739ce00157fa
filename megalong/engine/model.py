"""The module DeepSpeed trains: HF decoder (+ LoRA+) and the chunked loss head.

    batch ──► decoder(input_ids, position_ids, segment_ids) ──► hidden (B, N, d)
          └──────────────────────── labels ─────────────────────┐
                                     ChunkedLMHead(hidden, labels) ──► (loss_sum, valid_tokens)

The HF model keeps its own ``lm_head`` for evaluation and generation; ``ChunkedLMHead`` shares
the same Parameter objects, so there is one copy of the weights.
"""

from __future__ import annotations

import torch
from torch import nn

from megalong.engine.loss import ChunkedLMHead, logit_softcap_of
from megalong.models.loading import decoder_of, lm_head_of


class TrainModule(nn.Module):
    """``forward(**batch) -> (loss_sum, valid_token_count)``; never builds full logits."""

    def __init__(self, model: nn.Module, loss_chunk_size: int = 1024) -> None:
        super().__init__()
        self.model = model
        self.loss_head = ChunkedLMHead(lm_head_of(model), chunk_size=loss_chunk_size, softcap=logit_softcap_of(model))
        self.pass_segment_ids = False

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        sp_context=None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        kwargs = {}
        if segment_ids is not None and self.pass_segment_ids:
            kwargs["segment_ids"] = segment_ids
        if sp_context is not None:  # sequence parallel: this rank's slice of the row (megalong.parallel.sharding)
            kwargs["sp_context"] = sp_context
        out = decoder_of(self.model)(input_ids=input_ids, position_ids=position_ids, use_cache=False, **kwargs)
        return self.loss_head(out.last_hidden_state, labels)
