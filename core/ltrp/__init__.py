"""LTRP, Learning to Rank Patches (Luo et al. 2024). Models: the shared ViT parts (`vit`), the MAE
teacher (`mae`), pseudo-scores and the ranker (`ranker`). Store wiring: models per dataset (`models`),
stored score maps and the ltrp jobs (`scoring`), and what the heatmap page draws (`view`)."""
