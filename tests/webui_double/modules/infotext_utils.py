"""modules/infotext_utils.py (v1.10.1) and the infotext writer of modules/processing.py: the
parts that decide how an extension's image parameter is written and read back.

- quote / unquote: infotext_utils.py L56-70.
- re_param, re_imagesize: L16-18.
- parse_generation_parameters: L233-265 (prompt, negative prompt and the last line's
  "key: value" pairs); the defaults it fills in afterwards for the WebUI's own fields
  (L267-364) do not touch an extension's keys and are left out.
- paste: connect_paste's paste_func, L476-517 (what each pasted field receives).
- create_infotext_parameters: processing.py L770-812 (list values taken per image, callables
  called, None dropped, "k: quote(v)" joined with ", ").
"""
import json
import re

import gradio as gr

re_param_code = r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)'
re_param = re.compile(re_param_code)
re_imagesize = re.compile(r"^(\d+)x(\d+)$")
type_of_gr_update = type(gr.update())


def quote(text):
    if ',' not in str(text) and '\n' not in str(text) and ':' not in str(text):
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text):
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


def parse_generation_parameters(x: str):
    res = {}
    prompt = ""
    negative_prompt = ""
    done_with_prompt = False

    *lines, lastline = x.strip().split("\n")
    if len(re_param.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ''

    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative_prompt += ("" if negative_prompt == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line

    for k, v in re_param.findall(lastline):
        try:
            if v[0] == '"' and v[-1] == '"':
                v = unquote(v)
            m = re_imagesize.match(v)
            if m is not None:
                res[f"{k}-1"] = m.group(1)
                res[f"{k}-2"] = m.group(2)
            else:
                res[k] = v
        except Exception:
            print(f"Error parsing \"{k}: {v}\"")

    res["Prompt"] = prompt
    res["Negative prompt"] = negative_prompt
    return res


def paste(paste_fields, params):
    """paste_func after parsing: one gradio update per (component, key or callable)."""
    res = []
    for output, key in paste_fields:
        if callable(key):
            try:
                v = key(params)
            except Exception:
                v = None
        else:
            v = params.get(key, None)

        if v is None:
            res.append(gr.update())
        elif isinstance(v, type_of_gr_update):
            res.append(v)
        else:
            try:
                valtype = type(output.value)
                if valtype == bool and v == "False":
                    val = False
                elif valtype == int:
                    val = float(v)
                else:
                    val = valtype(v)
                res.append(gr.update(value=val))
            except Exception:
                res.append(gr.update())
    return res


def create_infotext(prompt, negative_prompt, generation_params, index=0):
    """The text create_infotext writes, from the WebUI's own parameters and the extensions'
    extra_generation_params merged into one dict (processing.py L770-814)."""
    generation_params = dict(generation_params)
    for key, value in generation_params.items():
        try:
            if isinstance(value, list):
                generation_params[key] = value[index]
            elif callable(value):
                generation_params[key] = value(p=None, index=index)  # the WebUI passes **locals()
        except Exception:
            generation_params[key] = None

    generation_params_text = ", ".join([k if k == v else f'{k}: {quote(v)}' for k, v in generation_params.items() if v is not None])
    negative_prompt_text = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative_prompt_text}\n{generation_params_text}".strip()
