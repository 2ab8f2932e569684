"""The toy world: procedural videos, prompts, pixel rewards and the shipped tiny model."""
