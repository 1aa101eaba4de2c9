"""The HyperVQ model folder. Self-contained (torch, transformers, geoopt and siblings only), because
`save_pretrained` copies it next to the weights as remote code."""
