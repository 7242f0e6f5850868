"""ArchLM: decoder-only language models whose architecture is chosen by configuration."""
