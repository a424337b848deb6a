"""comfy/sampler_helpers.py convert_cond (L57-67): each [tensor, dict] entry becomes the dict
with the tensor as "cross_attn", empty "model_conds" and a uuid of its own."""
import uuid


def convert_cond(cond):
    out = []
    for tensor, extra in cond:
        entry = extra.copy()
        if tensor is not None:
            entry["cross_attn"] = tensor
        entry["model_conds"] = entry.get("model_conds", {})
        entry["uuid"] = uuid.uuid4()
        out.append(entry)
    return out
