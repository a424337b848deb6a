"""modules/prompt_parser.py: SdConditioning (L139-153), schedules (L28-135, only the
"[before:after:when]" form, with the same step arithmetic), get_learned_conditioning (L157-202),
the AND split (L205-237), reconstruct_cond_batch (L270-304), stack_conds and
reconstruct_multicond_batch (L307-348)."""
import re
from collections import namedtuple

ScheduledPromptConditioning = namedtuple("ScheduledPromptConditioning", ["end_at_step", "cond"])


class SdConditioning(list):
    def __init__(self, prompts, is_negative_prompt=False, width=None, height=None, copy_from=None):
        super().__init__()
        self.extend(prompts)
        copy_from = prompts if copy_from is None else copy_from
        self.is_negative_prompt = is_negative_prompt or getattr(copy_from, "is_negative_prompt", False)
        self.width = width or getattr(copy_from, "width", None)
        self.height = height or getattr(copy_from, "height", None)


class DictWithShape(dict):
    def __init__(self, x, shape=None):
        super().__init__()
        self.update(x)

    @property
    def shape(self):
        return self["crossattn"].shape


_scheduled = re.compile(r"\[([^\[\]:]*):([^\[\]:]*):\s*([-+]?\d*\.?\d+)\s*\]")


def prompt_schedule(prompt, base_steps, hires_steps=None, use_old_scheduling=False):
    if hires_steps is None or use_old_scheduling:
        int_offset, flt_offset, steps = 0, 0, base_steps
    else:
        int_offset, flt_offset, steps = base_steps, 1.0, hires_steps
    match = _scheduled.search(prompt)
    if match is None:
        return [[steps, prompt]]
    text = match.group(3)
    when = float(text)
    when = (when - flt_offset) * steps if "." in text else when - int_offset
    when = min(steps, int(when))
    before = prompt[:match.start()] + match.group(1) + prompt[match.end():]
    after = prompt[:match.start()] + match.group(2) + prompt[match.end():]
    if when < 1:
        return [[steps, after]]
    return [[when, before], [steps, after]]


def get_learned_conditioning_prompt_schedules(prompts, base_steps, hires_steps=None,
                                             use_old_scheduling=False):  # L28-135
    return [prompt_schedule(p, base_steps, hires_steps, use_old_scheduling) for p in prompts]


def get_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False):
    res, cache = [], {}
    for prompt in prompts:
        if prompt in cache:
            res.append(cache[prompt])
            continue
        schedule = prompt_schedule(prompt, steps, hires_steps, use_old_scheduling)
        texts = SdConditioning([x[1] for x in schedule], copy_from=prompts)
        conds = model.get_learned_conditioning(texts)
        entries = []
        for i, (end_at_step, _) in enumerate(schedule):
            cond = {k: v[i] for k, v in conds.items()} if isinstance(conds, dict) else conds[i]
            entries.append(ScheduledPromptConditioning(end_at_step, cond))
        cache[prompt] = entries
        res.append(entries)
    return res


re_AND = re.compile(r"\bAND\b")
re_weight = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


class ComposableScheduledPromptConditioning:
    def __init__(self, schedules, weight=1.0):
        self.schedules, self.weight = schedules, weight


class MulticondLearnedConditioning:
    def __init__(self, shape, batch):
        self.shape, self.batch = shape, batch


def get_multicond_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False):
    res_indexes, flat, index_of = [], SdConditioning(prompts), {}
    flat.clear()
    for prompt in prompts:
        indexes = []
        for subprompt in re_AND.split(prompt):
            text, weight = re_weight.search(subprompt).groups()
            weight = float(weight) if weight is not None else 1.0
            if text not in index_of:
                index_of[text] = len(flat)
                flat.append(text)
            indexes.append((index_of[text], weight))
        res_indexes.append(indexes)
    learned = get_learned_conditioning(model, flat, steps, hires_steps, use_old_scheduling)
    batch = [[ComposableScheduledPromptConditioning(learned[i], w) for i, w in ix] for ix in res_indexes]
    return MulticondLearnedConditioning(shape=(len(prompts),), batch=batch)


def _pick(schedule, current_step):
    for index, entry in enumerate(schedule):
        if current_step <= entry.end_at_step:
            return entry.cond
    return schedule[0].cond


def reconstruct_cond_batch(c, current_step):
    import torch
    param = c[0][0].cond
    if isinstance(param, dict):
        res = {k: torch.zeros((len(c),) + v.shape, device=v.device, dtype=v.dtype) for k, v in param.items()}
        res = DictWithShape(res, (len(c),) + param["crossattn"].shape)
    else:
        res = torch.zeros((len(c),) + param.shape, device=param.device, dtype=param.dtype)
    for i, schedule in enumerate(c):
        cond = _pick(schedule, current_step)
        if isinstance(param, dict):
            for k, v in cond.items():
                res[k][i] = v
        else:
            res[i] = cond
    return res


def stack_conds(tensors):
    import torch
    token_count = max(x.shape[0] for x in tensors)
    for i in range(len(tensors)):
        if tensors[i].shape[0] != token_count:
            last = tensors[i][-1:]
            tensors[i] = torch.vstack([tensors[i], last.repeat([token_count - tensors[i].shape[0], 1])])
    return torch.stack(tensors)


def reconstruct_multicond_batch(c, current_step):
    tensors, conds_list = [], []
    for composable_prompts in c.batch:
        conds_for_batch = []
        for composable in composable_prompts:
            conds_for_batch.append((len(tensors), composable.weight))
            tensors.append(_pick(composable.schedules, current_step))
        conds_list.append(conds_for_batch)
    if isinstance(tensors[0], dict):
        stacked = {k: stack_conds([x[k] for x in tensors]) for k in tensors[0].keys()}
        stacked = DictWithShape(stacked, stacked["crossattn"].shape)
    else:
        stacked = stack_conds(tensors)
    return conds_list, stacked
