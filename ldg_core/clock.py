"""Step clocks: which step of the user's schedule a model call belongs to.

Warmup and cooldown count the steps of the schedule the user set, as a txt2img run of that
sampler makes them; a step is the sampler's step, whatever its model calls. Hosts that run the
WebUI's samplers (A1111 and its forks) count the CFG denoiser's calls within a pass: this
module turns that count into the step index, by sampler label. Measured call sequences of a
real WebUI 1.10.1 are in tests/data/webui_1_10_1_calls.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

_VARYING_CALLS = "its number of model calls per step changes during the run"
# Samplers whose model calls cannot be placed on the step schedule the user set.
REFUSED_SAMPLERS = {
    "DPM fast": "it picks its own evaluation points instead of the step schedule",
    "DPM adaptive": "it picks its own evaluation points instead of the step schedule",
    "Restart": "it jumps back to higher noise levels, so steps repeat out of order",
    # Forge's and Forge Neo's own: their calls per step change within a run, with nothing that
    # tells the counter (Forge k_diffusion/sampling.py sample_heunpp2: 3, then 2, then 1;
    # Neo's Kohaku LoNyu Yog 3 in the first half, then 1; DPM++ 2s a RF and DPM++ SDE CFG++ 2,
    # then 1 at the end).
    "HeunPP2": _VARYING_CALLS,
    "Kohaku LoNyu Yog": _VARYING_CALLS,
    "DPM++ 2s a RF": _VARYING_CALLS,
    "Flux Realistic": _VARYING_CALLS,  # Neo's other name for DPM++ 2s a RF
    "DPM++ SDE CFG++": _VARYING_CALLS,
}
# Timestep samplers whose first step makes an extra model call (PLMS's pseudo improved Euler,
# sd_samplers_timesteps_impl.py L116-120).
EXTRA_FIRST_CALLS = {"PLMS": 1}
# Timestep samplers that evaluate the model once at each of the WebUI's N timesteps, where DDIM
# and PLMS step between them (N - 1 steps): UniPC gets N as its step count and makes one call
# at each of its N points but the last (uni_pc.py sample(): model_fn before the loop, then the
# corrector's call inside each update, none in the final update).
ONE_CALL_PER_TIMESTEP = {"UniPC"}


@dataclass(frozen=True)
class StepClock:
    """Maps the denoiser's call counter within a pass to the step index of the full schedule.

    `offset` is the index of the pass's first step (img2img and hires passes join the schedule
    part-way), `calls_per_step` is 2 for samplers that evaluate the model twice per step,
    `end_step` the number of steps of the full schedule (None: not known).
    """

    offset: int = 0
    calls_per_step: int = 1
    extra_first_calls: int = 0
    end_step: Optional[int] = None

    def index(self, call: int) -> int:
        return self.offset + max(call - self.extra_first_calls, 0) // self.calls_per_step


def step_clock(sampler_name: str, *, second_order: bool, steps: int,
               timestep_count: Optional[int] = None,
               img2img_schedule: Optional[Tuple[int, int]] = None) -> StepClock:
    """The clock of one pass of `steps` steps (the full schedule's, for img2img and hires).

    `timestep_count`: for timestep samplers (DDIM, PLMS, UniPC), how many timesteps the
    WebUI's get_timesteps gives for the full schedule: they are 1000 // steps apart
    (sd_samplers_timesteps.py L86-97), so 10 steps give 10 but 12 give 13. None for
    k-diffusion samplers. `img2img_schedule` is (steps, t_enc) as the WebUI's
    setup_img2img_steps gives them for an img2img or hires pass; None for txt2img.

    A pass of img2img or hires runs the last steps of the full schedule: k-diffusion runs
    sigmas[steps - t_enc - 1:] (sd_samplers_kdiffusion.py L138-139), timestep samplers
    timesteps[:t_enc] (sd_samplers_timesteps.py L101-103). Raises ValueError for samplers that
    follow no fixed schedule.
    """
    if sampler_name in REFUSED_SAMPLERS:
        raise ValueError(f"the sampler {sampler_name!r} is not supported: "
                         f"{REFUSED_SAMPLERS[sampler_name]}. Choose another sampler")
    if timestep_count is None:
        first = steps - img2img_schedule[1] - 1 if img2img_schedule else 0
        return StepClock(max(first, 0), 2 if second_order else 1, end_step=steps)
    end = timestep_count if sampler_name in ONE_CALL_PER_TIMESTEP else timestep_count - 1
    first = max(timestep_count - img2img_schedule[1], 0) if img2img_schedule else 0
    return StepClock(first, 1, EXTRA_FIRST_CALLS.get(sampler_name, 0), end)
