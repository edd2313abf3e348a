"""The Mamba-2 hybrids (``bamba``, ``nemotron_h``, ``granitemoehybrid``, ``zamba2``,
``falcon_h1``): their Mamba-2 mixers through `lasp.layers.mamba2.mamba2_mixer`.

transformers' mixers (the torch path of each, `mamba2_chunk_scan` inside):

    z, xBC, dt = in_proj(x)                  x, B, C = act(conv1d(xBC))   (depthwise, causal, bias)
    y          = SSD(x, B, C, Δ = clamp(softplus(dt + dt_bias), time_step_limit), A = −exp(A_log)) + D·x
    out        = out_proj(gated RMSNorm(y, z))

which is lasp's linear attention with q = C, k = B (n_groups groups shared by consecutive
heads), v = Δ·x, per-token log-decay g = Δ·A and no query scaling (`mamba2_mixer`): LASP-2
under SP, the convolution through the SP halo, and packed documents reset both. The
per-model differences, read off the module:

- bamba, nemotron_h, granitemoehybrid, zamba2: norm(y ⊙ silu(z)) in groups of
  `norm.group_size` channels (intermediate_size / n_groups); zamba2's time_step_limit is
  (time_step_min, ∞) and its norm eps 1e-5, both held by the module.
- falcon_h1: µP multipliers around in_proj (input × `ssm_in_multiplier`, projection ×
  `mup_vector`; `ssm_out_multiplier` is the decoder layer's); the gated norm is optional
  (`mamba_rms_norm`; without it y ⊙ silu(z)), in `norm.n_groups` groups, normalising before
  the gate when `norm_before_gate`.

The softmax layers go through `lasp_sp`; MLPs and MoE blocks are per token.
"""

from __future__ import annotations

from lasp.integrations.hf.context import check_training_call, context_of
from lasp.layers.mamba2 import mamba2_mixer

MODEL_TYPES = ("bamba", "nemotron_h", "granitemoehybrid", "zamba2", "falcon_h1")


def _mix(module, projected, norm_weight, norm_eps, norm_groups, norm_before_gate=False):
    """`mamba2_mixer` on the HF mixer's own parameters and sizes, then its out_proj."""
    y = mamba2_mixer(projected, module.conv1d.weight[:, 0], module.conv1d.bias, module.A_log, module.dt_bias,
                     module.D, norm_weight, num_heads=module.num_heads, head_dim=module.head_dim,
                     n_groups=module.n_groups, state_size=module.ssm_state_size,
                     time_step_limit=tuple(module.time_step_limit), activation=module.act, norm_eps=norm_eps,
                     norm_groups=norm_groups, norm_before_gate=norm_before_gate,
                     **context_of(module).op_kwargs(projected.shape[1]))
    return module.out_proj(y)


def mixer_forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
    """The forward of `BambaMixer`, `NemotronHMamba2Mixer`, `GraniteMoeHybridMambaLayer` and
    `Zamba2MambaMixer` on lasp's kernels → output. A cache or padding mask is refused."""
    check_training_call(self, cache, attention_mask, **kwargs)
    norm = self.norm
    return _mix(self, self.in_proj(hidden_states), norm.weight, norm.variance_epsilon,
                self.intermediate_size // norm.group_size)


def falcon_h1_forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
    """`FalconH1Mixer.forward` on lasp's kernels → output: µP multipliers, optional gated norm
    (module docstring). A cache or padding mask is refused."""
    check_training_call(self, cache, attention_mask, **kwargs)
    projected = self.in_proj(hidden_states * self.ssm_in_multiplier) * self.mup_vector
    if not self.mamba_rms_norm:
        return _mix(self, projected, None, 0.0, 1)
    norm = self.norm
    return _mix(self, projected, norm.weight, norm.variance_epsilon, norm.n_groups, norm.norm_before_gate)


ADAPTERS = {"BambaMixer": mixer_forward, "NemotronHMamba2Mixer": mixer_forward,
            "GraniteMoeHybridMambaLayer": mixer_forward, "Zamba2MambaMixer": mixer_forward,
            "FalconH1Mixer": falcon_h1_forward}
