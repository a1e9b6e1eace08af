"""Configuration of Skywork-MoE checkpoints written by skymoe (transformers remote code)."""

from transformers import PretrainedConfig


class SkyworkMoeConfig(PretrainedConfig):
    model_type = "skywork_moe"

    def __init__(self, tie_word_embeddings=False, **kwargs):
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
