"""Subset training: semantic vs random vs full (Birodkar et al. 2019, Figure 2). Being built."""
