"""The batch contract: what every training and evaluation batch holds, in one place.

    key           shape   dtype   meaning
    input_ids     (B, N)  int64   tokens of the row
    labels        (B, N)  int64   the next token of each position (shifted in the data); IGNORE_INDEX: not scored
    position_ids  (B, N)  int64   RoPE positions, global in the row (restarting per document with
                                  data.reset_position_ids)
    segment_ids   (B, N)  int32   document id of each token (a new id after each EOD); attention honours
                                  them with data.doc_mask

Sequence parallelism (megalong.parallel.sharding) keeps tokens [r·L, (r+1)·L) of input_ids, labels
and position_ids on sp-rank r and turns the whole row's position and segment ids into the
attention's ``sp_context``.
"""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = -100
"""Label of positions that are not scored (prompts, padding)."""

ITEM_DTYPES = {"input_ids": np.int64, "labels": np.int64, "position_ids": np.int64, "segment_ids": np.int32}
"""numpy dtype of each key of a row (collated into torch tensors of the same dtypes)."""

BATCH_KEYS = tuple(ITEM_DTYPES)
"""The keys a batch may carry into the model."""
