"""Skywork-MoE for transformers (remote code shipped with skymoe checkpoints).

The computation is skymoe's PyTorch reference of Skywork-MoE (skywork_moe_ref.py, next to this
file): gating logit normalisation, top-2 routing, expert interval, optional two-layer gate.
Dropless; no KV cache (generation recomputes the prefix).
"""

import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_skywork_moe import SkyworkMoeConfig
from .skywork_moe_ref import SkyworkInner
from .skywork_moe_ref import SkyworkMoeConfig as _RefConfig
from .skywork_moe_ref import rope_cos_sin


class SkyworkForCausalLM(PreTrainedModel):
    config_class = SkyworkMoeConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.ref_config = _RefConfig.from_dict(config.to_dict())
        self.model = SkyworkInner(self.ref_config)
        self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def _init_weights(self, module):
        pass

    def forward(self, input_ids=None, labels=None, **kwargs):
        cfg = self.ref_config
        dtype = self.model.embed_tokens.weight.dtype
        outs = []
        for seq in input_ids:
            t = seq.shape[0]
            cos, sin = rope_cos_sin(cfg.head_dim, cfg.rope_theta, torch.arange(t, device=seq.device), dtype)
            h = self.model.embed_tokens(seq)
            for layer in self.model.layers:
                h = layer(h, cos, sin)
            outs.append(self.lm_head(self.model.norm(h)))
        logits = torch.stack(outs)
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1)
            )
        return CausalLMOutput(loss=loss, logits=logits)
