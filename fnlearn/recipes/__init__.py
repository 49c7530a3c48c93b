"""Recipes: whole workloads composed from models, data and the training core."""
