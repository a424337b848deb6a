"""comfy/model_sampling.py L30-86: the prediction classes a model's sampling object derives
from (V_PREDICTION from EPS, X0 from EPS, CONST apart), and L106-183's discrete schedule."""
import torch


class EPS:
    pass


class V_PREDICTION(EPS):
    pass


class EDM(V_PREDICTION):
    pass


class CONST:
    pass


class X0(EPS):
    pass


class ModelSamplingDiscrete(torch.nn.Module):
    def __init__(self, alphas_cumprod):
        super().__init__()
        self.register_buffer("sigmas", ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5)

    @property
    def sigma_min(self):
        return self.sigmas[0]

    @property
    def sigma_max(self):
        return self.sigmas[-1]


def model_sampling(kind, alphas_cumprod):
    """A model's sampling object: ModelSamplingDiscrete with `kind`'s prediction class, as
    comfy/model_base.py model_sampling() L77-105 composes it."""
    class ModelSampling(ModelSamplingDiscrete, kind):
        pass
    return ModelSampling(alphas_cumprod)
