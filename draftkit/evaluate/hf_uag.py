"""A scoped fix for transformers' Universal Assisted Generation (a draft with another tokenizer, greedy).

In transformers 5.x, ``AssistedCandidateGeneratorDifferentTokenizers`` rolls the assistant's KV cache back by a
count in target tokens (``_last_ids_length``) applied to assistant tokens, so after the first rejected proposal
the cache keeps stale positions and the next round crashes (an empty forward) or drafts from a wrong context.
:func:`assistant_cache_fix` replaces that rollback, for the duration of a ``with`` block, by the plain rule:
keep the longest cached prefix that equals the assistant's new input. Nothing else of transformers changes, and
outside the block the original method is back. Where the internals it relies on are absent, it does nothing.
"""

from __future__ import annotations

import contextlib

from draftkit.evaluate.proposers import crop


@contextlib.contextmanager
def assistant_cache_fix():
    try:
        from transformers.generation import candidate_generator as cg

        cls = cg.AssistedCandidateGeneratorDifferentTokenizers
        update, prepare = cls._update_past_and_masks, cls._prepare_assistant_input_ids
        helpers = cg._prepare_attention_mask, cg._prepare_position_ids, cg._prepare_token_type_ids
    except (ImportError, AttributeError):
        yield
        return

    def prepare_input_ids(self, input_ids):
        # the ids the assistant's cache was built from (the method below edits prev_assistant_ids in place)
        previous = getattr(self, "prev_assistant_ids", None)
        self._draftkit_cached_from = previous.clone() if previous is not None else None
        return prepare(self, input_ids)

    def update_past_and_masks(self, input_ids, num_extra_tokens_to_remove=0):
        cache = self.assistant_kwargs.get("cache")
        built = getattr(self, "_draftkit_cached_from", None)
        if cache is None or built is None or self.assistant_model.config.is_encoder_decoder:
            return update(self, input_ids, num_extra_tokens_to_remove)
        n = min(cache.get_seq_length(), built.shape[-1], input_ids.shape[-1] - 1)
        same = (built[0, :n] == input_ids[0, :n].to(built.device)).tolist()
        crop(cache, same.index(False) if False in same else n)
        attention, position, token_type = helpers
        self.assistant_kwargs = attention(self.assistant_kwargs, input_ids.shape[-1], False)
        self.assistant_kwargs = position(self.assistant_kwargs, input_ids.shape[-1], False)
        self.assistant_kwargs = token_type(self.assistant_kwargs, input_ids.shape[-1])
        return True

    cls._prepare_assistant_input_ids, cls._update_past_and_masks = prepare_input_ids, update_past_and_masks
    try:
        yield
    finally:
        cls._prepare_assistant_input_ids, cls._update_past_and_masks = prepare, update
