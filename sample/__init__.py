"""Sampling: join the separately trained parts and turn prompts into pictures (`python -m sample --help`)."""
