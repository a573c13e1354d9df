"""MambAttention speech enhancement (Kühne et al. 2025, "MambAttention: Mamba with
Multi-Head Attention for Generalizable Single-Channel Speech Enhancement") on a
pure-PyTorch Mamba (Gu & Dao 2023) and the MP-SENet losses (Lu et al. 2023)."""
