"""Proving ground: a procedural VQA benchmark (and, later, trained small model pairs)."""
