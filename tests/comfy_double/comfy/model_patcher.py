"""comfy/model_patcher.py: clone() deep-copies the model options (L284-300); post-CFG functions
are appended, with disable_cfg1_optimization set on request (L75-85, L390-391);
get_model_object("model_sampling") gives the model's sampling object."""
import copy


def set_model_options_post_cfg_function(model_options, post_cfg_function,
                                        disable_cfg1_optimization=False):
    model_options["sampler_post_cfg_function"] = model_options.get(
        "sampler_post_cfg_function", []) + [post_cfg_function]
    if disable_cfg1_optimization:
        model_options["disable_cfg1_optimization"] = True
    return model_options


class ModelPatcher:
    def __init__(self, model, model_options=None):
        self.model = model
        self.model_options = model_options if model_options is not None else {
            "transformer_options": {}}

    def clone(self):
        return ModelPatcher(self.model, copy.deepcopy(self.model_options))

    def get_model_object(self, name):
        return getattr(self.model, name)

    def set_model_sampler_post_cfg_function(self, post_cfg_function,
                                            disable_cfg1_optimization=False):
        set_model_options_post_cfg_function(self.model_options, post_cfg_function,
                                            disable_cfg1_optimization)

    def set_model_sampler_cfg_function(self, sampler_cfg_function,
                                       disable_cfg1_optimization=False):
        self.model_options["sampler_cfg_function"] = sampler_cfg_function
        if disable_cfg1_optimization:
            self.model_options["disable_cfg1_optimization"] = True

    def set_model_sampler_pre_cfg_function(self, pre_cfg_function,
                                           disable_cfg1_optimization=False):
        self.model_options["sampler_pre_cfg_function"] = self.model_options.get(
            "sampler_pre_cfg_function", []) + [pre_cfg_function]
        if disable_cfg1_optimization:
            self.model_options["disable_cfg1_optimization"] = True
