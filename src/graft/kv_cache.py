"""The name transformers gives a model's KV cache, in and out: `past_key_values` until transformers 5.x
renamed it `cache` (the old name still works there, with a warning, until it is removed)."""

from __future__ import annotations

import functools
import inspect


@functools.cache
def _takes_cache(model_class: type) -> bool:
    call = getattr(model_class, "forward", None) or model_class.__call__  # graft's decoder is a callable
    return "cache" in inspect.signature(call).parameters


def cache_kwargs(model, cache) -> dict:
    """{name: cache} for a forward call of `model`, under the name its forward takes."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT passes kwargs on
    return {"cache" if _takes_cache(type(inner)) else "past_key_values": cache}


def output_cache(out):
    """The KV cache a forward returned, read under whichever name it carries."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values
