"""The attn-demo stage of attn_vision and the recipe of its digits model."""
